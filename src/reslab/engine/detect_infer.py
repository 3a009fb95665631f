"""Evaluation and prediction with a trained C4 detector: the inference fast path, the int8
res5 head, test-time views, the rescoring classifier, and `detect eval|predict` as a whole."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from reslab.data.coco import CocoDetection, collate, decode_rgb, eval_transforms, resolve
from reslab.engine.checkpoint import atomic_write, load_checkpoint
from reslab.engine.coco_eval import coco_evaluate, report_metrics
from reslab.engine.detect_config import InferConfig
from reslab.engine.detection import detector_from_checkpoint
from reslab.engine.rescore import rescorer_from_checkpoint
from reslab.fast import autocast, fold_batchnorm_
from reslab.models.detection import DeferredRoIAlign, detect_averaged
from reslab.precision import resolve_precision, time_forward
from reslab.quantize import int8_pays, quantize_stage


def prepare_detector_for_inference(model):
    """The detector in eval mode with every batch norm folded into its convolution, the
    weights in channels_last and the RoIs pooled and run through res5 a chunk at a time
    (:class:`~reslab.models.detection.DeferredRoIAlign`): the inference fast path, in place;
    ``benchmarks/detection.py infer`` times it against the eager model."""
    model.eval()
    fold_batchnorm_(model)
    heads = model.roi_heads
    if not isinstance(heads.box_roi_pool, DeferredRoIAlign):
        heads.box_roi_pool = DeferredRoIAlign(heads.box_roi_pool)
    return model.to(memory_format=torch.channels_last)


def quantize_detector_head(
    model,
    images: Iterable[torch.Tensor],
    run: Callable[[object, torch.Tensor], object] | None = None,
) -> int:
    """Make the res5 box head int8 in place (:mod:`reslab.quantize`), calibrated by running the
    detector on ``images`` (float CHW in [0, 1]); returns how many RoIs calibrated it.

    ``model`` must come from :func:`prepare_detector_for_inference` (batch norm folded). The
    trunk and RPN stay fp32: the head, run once per RoI, is where the time goes. ``run(model,
    image)`` replaces the plain ``model([image])`` (a benchmark feeds fixed proposals).
    """
    run = run or (lambda detector, image: detector([image]))
    head = model.roi_heads.box_head
    fp32 = head.layer4
    rois = 0

    def count(module, inputs):
        nonlocal rois
        rois += len(inputs[0])  # a tensor of pooled RoIs or PendingRoIs

    def calibrate(stage):
        head.layer4 = stage
        hook = head.register_forward_pre_hook(count)
        try:
            for image in images:
                run(model, image)
        finally:
            hook.remove()
            head.layer4 = fp32

    head.layer4 = quantize_stage(fp32, calibrate)
    return rois


@torch.no_grad()
def _detect(
    model,
    images: list[torch.Tensor],
    precision: str,
    flip: bool,
    scales: Sequence[float],
    refine: bool = False,
    rescorer=None,
) -> list[dict]:
    with autocast(precision):
        if flip or refine or tuple(scales) != (1.0,):
            outputs = detect_averaged(model, images, scales, flip, refine)
        else:
            outputs = model(images)
    return outputs if rescorer is None else rescorer.rescore(outputs, images, precision == "bf16")


def predict_dataset(
    model,
    dataset: CocoDetection,
    batch_size: int = 4,
    precision: str = "fp32",
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    refine: bool = False,
    rescorer=None,
) -> list[dict]:
    """Detections over a dataset in COCO results format (original category ids, xywh boxes);
    ``flip``, ``scales``: the box head averaged over each image's mirror and resized views,
    ``refine``: and run again at the boxes it moved the proposals to
    (:func:`~reslab.models.detection.detect_averaged`); ``rescorer``: each score times a
    :class:`~reslab.engine.rescore.Rescorer`'s probability of its label."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    results = []
    for images, targets in loader:
        outputs = _detect(model, list(images), precision, flip, scales, refine, rescorer)
        for output, target in zip(outputs, targets, strict=True):
            boxes = output["boxes"].float()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(
                boxes.tolist(),
                output["scores"].float().tolist(),
                output["labels"].tolist(),
                strict=True,
            ):
                results.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": dataset.category_ids[label - 1],
                        "bbox": [round(v, 2) for v in box],
                        "score": round(score, 5),
                    }
                )
    return results


def evaluate_detector(
    model,
    dataset: CocoDetection,
    batch_size: int = 4,
    precision: str = "fp32",
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    refine: bool = False,
    rescorer=None,
) -> dict:
    return coco_evaluate(
        dataset.coco,
        predict_dataset(model, dataset, batch_size, precision, flip, scales, refine, rescorer),
    )


def read_image(path: str | Path, scale: bool = True) -> torch.Tensor:
    """An image file as an RGB CHW tensor: float in [0, 1], or uint8 with ``scale=False``."""
    image = decode_rgb(path)
    return image.float() / 255 if scale else image


@torch.no_grad()
def predict_images(
    model,
    paths: Iterable[str | Path],
    class_names: Sequence[str],
    out: str | Path,
    score_thresh: float = 0.5,
    precision: str = "fp32",
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    refine: bool = False,
    rescorer=None,
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
    """Detect on image files; write ``out/<name>.png`` with boxes drawn and return the records,
    each detection with its class name and, given ``category_ids`` (the dataset's, in label
    order), its original category id."""
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in map(Path, paths):
        image = read_image(path, scale=False)
        output = _detect(model, [image.float() / 255], precision, flip, scales, refine, rescorer)[0]
        boxes, found = detections(output, class_names, score_thresh, category_ids)
        drawn = draw_bounding_boxes(
            image,
            boxes,
            labels=[f"{d['label']} {d['score']:.2f}" for d in found],
            colors="red",
            width=1,
        )
        drawn_path = out / f"{path.stem}.png"
        write_png(drawn, str(drawn_path))
        records.append({"image": str(path), "drawn": str(drawn_path), "detections": found})
    return records


def detections(
    output: dict,
    class_names: Sequence[str],
    score_thresh: float,
    category_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """One image's detector output above ``score_thresh``: its boxes (M, 4) xyxy, and a record
    per box (label, score, box) as `detect predict` and `reslab serve` report them; given
    ``category_ids`` (the dataset's, in label order), each record has its original id too."""
    keep = output["scores"] >= score_thresh
    boxes = output["boxes"][keep].float()
    indices = [i - 1 for i in output["labels"][keep].tolist()]
    scores = output["scores"][keep].float().tolist()
    records = []
    for index, score, box in zip(indices, scores, boxes.tolist(), strict=True):
        record = {"label": class_names[index], "score": round(score, 4)}
        if category_ids:
            record["category_id"] = category_ids[index]
        records.append({**record, "box_xyxy": [round(v, 1) for v in box]})
    return boxes, records


def detect_images(
    model, images: list[torch.Tensor], class_names: Sequence[str], precision: str = "fp32"
) -> list[list[dict]]:
    """The records (:func:`detections`) of uint8 RGB images, detected as one batch at the
    model's own score threshold."""
    outputs = _detect(model, [image.float() / 255 for image in images], precision, False, (1.0,))
    return [detections(o, class_names, model.roi_heads.score_thresh)[1] for o in outputs]


def inference_precision(
    config: InferConfig, model, image: Callable[[], torch.Tensor], say: Callable[[str], None]
) -> str:
    """``config.precision`` resolved for ``model``: "auto" times ``image()`` through the
    detector in fp32 and in bf16 (:func:`reslab.precision.resolve_precision`). With the int8
    head the trunk runs in fp32."""
    if config.int8:
        return "fp32"

    def measure(precision: str) -> float:
        with autocast(precision):
            return time_forward(lambda x: model([x]), image(), runs=1)

    precision, _ = resolve_precision(
        config.precision, measure=measure, say=say, what="one image through the detector"
    )
    return precision


def _quantize(model, images: Sequence[torch.Tensor], console: Console) -> None:
    if not int8_pays():
        console.print("note: this CPU has no VNNI; int8 convolutions may be slower than fp32")
    started = time.perf_counter()
    rois = quantize_detector_head(model, images)
    console.print(
        f"int8 res5 head calibrated on {len(images)} images ({rois} RoIs) "
        f"in {time.perf_counter() - started:.1f} s"
    )


def _load(config: InferConfig) -> tuple[object, dict]:
    """The checkpoint's detector on the inference fast path, with the config's NMS IoU."""
    if config.threads:
        torch.set_num_threads(config.threads)
    payload = load_checkpoint(config.checkpoint)
    model = prepare_detector_for_inference(detector_from_checkpoint(payload))
    if config.nms is not None:
        model.roi_heads.nms_thresh = config.nms
    return model, payload


def _rescorer(config: InferConfig, payload: dict):
    """The checkpoint's rescoring classifier unless ``config.rescore`` is off; None without."""
    return rescorer_from_checkpoint(payload) if config.rescore else None


def _calibration_images(config: InferConfig, dataset: CocoDetection) -> list[torch.Tensor]:
    """The train split's first images with --data (when it has one), else the evaluated."""
    source = dataset
    if config.data.data is not None and config.split != "train":
        images, annotations = resolve(config.data.data, None, None, "train")
        if annotations.is_file():
            source = CocoDetection(images, annotations, eval_transforms())
    return [source[i][0] for i in range(min(config.calibration_images, len(source)))]


def evaluate_checkpoint(config: InferConfig, console: Console) -> dict:
    """`detect eval`: COCO box AP of a checkpoint on a split, reported and returned."""
    model, payload = _load(config)
    if config.score_thresh is not None:
        model.roi_heads.score_thresh = config.score_thresh
    dataset = config.data.dataset(config.split, eval_transforms())
    if config.int8:
        _quantize(model, _calibration_images(config, dataset), console)
    rescorer = _rescorer(config, payload)
    if rescorer is not None:
        console.print("scores rescored by the checkpoint's classifier (--no-rescore: not)")
    precision = inference_precision(config, model, lambda: dataset[0][0], console.print)
    metrics = evaluate_detector(
        model,
        dataset,
        config.batch_size,
        precision,
        config.flip,
        config.scales,
        config.refine,
        rescorer,
    )
    title = config.split if config.data.data else str(config.data.annotations)
    report_metrics(console, metrics, title)
    if config.json:
        Path(config.json).write_text(json.dumps(metrics, indent=1))
    return metrics


def predict_files(config: InferConfig, console: Console) -> list[dict]:
    """`detect predict`: each image drawn with its detections into ``config.out``, the
    records in ``predictions.json`` there, one line per image on stdout; notes to
    ``console``."""
    model, payload = _load(config)
    heads = model.roi_heads
    thresh = heads.score_thresh if config.score_thresh is None else config.score_thresh
    heads.score_thresh = min(heads.score_thresh, thresh)
    if config.int8:
        images = [read_image(path) for path in config.files[: config.calibration_images]]
        _quantize(model, images, console)
    precision = inference_precision(
        config, model, lambda: read_image(config.files[0]), console.print
    )
    records = predict_images(
        model,
        config.files,
        payload["class_names"],
        config.out,
        thresh,
        precision,
        config.flip,
        config.scales,
        config.refine,
        _rescorer(config, payload),
        payload.get("category_ids"),
    )
    path = Path(config.out) / "predictions.json"
    atomic_write(path, lambda f: f.write(json.dumps(records, indent=1).encode()))
    for record in records:
        print(f"{record['image']}: {len(record['detections'])} objects -> {record['drawn']}")
    print(f"detections: {path}")
    return records
