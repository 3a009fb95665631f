"""Training, COCO evaluation and prediction for the C4 detector (no argument parsing here).

The model returns named losses (torchvision's detection convention); the loop sums them, logs
each, and stops on the first non-finite value before it reaches the weights, so the last
checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.io import write_png
from torchvision.ops import box_convert, box_iou, nms
from torchvision.utils import draw_bounding_boxes

from reslab.data.coco import CocoDetection, collate, decode_rgb
from reslab.engine.checkpoint import load_checkpoint, make_payload, save_checkpoint
from reslab.engine.distributed import World, any_rank, check_batch, wrap
from reslab.errors import ReslabError
from reslab.fast import autocast, fold_batchnorm_
from reslab.models.detection import (
    SPEC_NAME,
    DeferredRoIAlign,
    DetectorConfig,
    build_detector,
    detect_averaged,
)
from reslab.quantize import quantize_stage

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


class NonFiniteLoss(ReslabError):
    """A loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class DetectTrainConfig:
    epochs: int = 12
    batch_size: int = 4
    lr: float = 0.02  # detectron2's 0.02 is for 16 images; scaled linearly by batch_size / 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 200  # linear warm-up from lr/1000 (Goyal et al. 2017; detectron2)
    clip_grad_norm: float = 10.0  # guards from-scratch runs against early blow-ups
    # autocast the forward pass to bfloat16: faster only on CPUs with AVX-512 bf16 or AMX; on
    # AVX2-only CPUs (this project's machine) PyTorch falls back to slow reference kernels
    bf16: bool = False
    # decay per step of an exponential moving average of the weights and batch-norm statistics
    # (Polyak averaging); checkpoints and the trained model hold the average; 0: off
    ema: float = 0.0
    seed: int = 0
    # a wall-clock budget: the schedule anneals within it and the run stops (with a checkpoint)
    # when it is spent; 0: no limit
    max_minutes: float = 0.0

    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 16


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero as ``progress`` goes 0->1.

    ``progress`` is the larger of the steps done and the time used, as fractions of the plan, so
    a run cut by a time budget still ends with its learning rate annealed.
    """
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_ema(decay: float) -> None:
    if not 0 <= decay < 1:
        raise ReslabError(f"--ema must be at least 0 and below 1 (such as 0.999), got {decay:g}")


def _payload(
    model, ema, optimizer, config, epoch, step, dataset: CocoDetection, rescorer: dict | None
) -> dict:
    extra = {} if rescorer is None else {"rescorer": rescorer}
    if ema is not None:
        # "state_dict" holds the averaged weights that eval and predict load; resuming also
        # needs the raw ones the optimizer moves
        extra["train_state_dict"] = model.state_dict()
        model = ema.module
    return make_payload(
        model,
        task="detection",
        optimizer=optimizer.state_dict(),
        epoch=epoch,
        step=step,
        train_config=asdict(config),
        class_names=list(dataset.class_names),
        category_ids=list(dataset.category_ids),
        rng_state=torch.get_rng_state(),
        **extra,
    )


def detector_from_checkpoint(payload: dict):
    """Rebuild the detector from a checkpoint's config and load its weights strictly."""
    if payload.get("task") != "detection" or payload["model"]["name"] != SPEC_NAME:
        raise ReslabError(
            f"this checkpoint holds a {payload.get('task')} model "
            f"({payload['model']['name']}), not a detector"
        )
    model = build_detector(DetectorConfig.from_dict(payload["model"]["kwargs"]))
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ReslabError(
            "the checkpoint's weights do not fit its detector config: " + " ".join(lines[1:3])[:300]
        ) from None
    return model


def prepare_detector_for_inference(model):
    """The detector in eval mode with every batch norm folded into its convolution, the
    weights in channels_last and the RoIs pooled and run through res5 a chunk at a time
    (:class:`~reslab.models.detection.DeferredRoIAlign`): the inference fast path, in place.
    ``benchmarks/detection.py infer`` times it against the eager model (README)."""
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


def train_detector(
    model,
    dataset: CocoDetection,
    config: DetectTrainConfig,
    out: str | Path,
    resume: bool = False,
    console: Console | None = None,
    world: World | None = None,
    rescorer: dict | None = None,
) -> dict:
    """Train, writing ``out/last.pt`` after each epoch and ``out/log.jsonl`` per step.

    Returns the last logged losses. With ``resume`` the model, optimizer, step, epoch and RNG
    state come from ``out/last.pt``. With ``config.ema`` the checkpoints hold the moving average
    of the weights, and ``model`` holds it when this returns. Under torchrun (``world``) each process takes its share
    of every global batch of ``config.batch_size`` images through a DistributedSampler, DDP
    averages the gradients, and only rank 0 writes files. ``rescorer``, a trained
    :class:`~reslab.engine.rescore.Rescorer`'s payload, rides in every checkpoint (a resumed run
    keeps the one its checkpoint has).
    """
    world = world or World()
    check_batch(world, config.batch_size)
    console = console or Console()
    out = Path(out)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=config.scaled_lr(),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    start_epoch, step, payload = 0, 0, None
    if resume:
        payload = load_checkpoint(out / "last.pt")
        model.load_state_dict(payload.get("train_state_dict", payload["state_dict"]))
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng_state"])
        start_epoch, step = payload["epoch"], payload["step"]
        rescorer = rescorer or payload.get("rescorer")
        console.print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}, step {step}")
    if world.active:
        sampler = DistributedSampler(dataset, world.size, world.rank, True, config.seed, True)
        sampler.set_epoch(start_epoch)
        loader = DataLoader(
            dataset, config.batch_size // world.size, sampler=sampler, collate_fn=collate
        )
    else:
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(config.seed + start_epoch),
            drop_last=True,
        )
    if len(loader) == 0:
        raise ReslabError(
            f"{len(dataset)} images make no full batch of {config.batch_size}; lower --batch-size"
        )
    total = config.epochs * len(loader)
    if world.is_main:
        (out / "config.json").write_text(
            json.dumps({"detector": model.spec["kwargs"], "train": asdict(config)}, indent=1)
        )
    started = time.monotonic()
    last: dict[str, float] = {}
    model.train()
    # oneDNN's convolutions run faster in channels_last: 7% less per step for the quarter-width
    # ResNet-18 C4 on the 256-pixel scenes (one thread); checkpoints load in either layout
    model.to(memory_format=torch.channels_last)
    ema = None
    if config.ema:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        if payload is not None:
            ema.module.load_state_dict(payload["state_dict"])
            # AveragedModel counts updates; past zero it averages instead of copying
            ema.n_averaged.fill_(max(payload["step"], 1))
    trained = wrap(model, world, sync_bn=False)
    with (
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=console,
            transient=False,
        ) as progress,
        # a resumed run adds to its log; a new one in a used folder starts it afresh
        (out / "log.jsonl").open("a" if resume else "w", buffering=1)
        if world.is_main
        else open(os.devnull, "w") as log,
    ):
        task = progress.add_task("train", total=total, completed=step, losses="")
        for epoch in range(start_epoch, config.epochs):
            progress.update(task, description=f"epoch {epoch + 1}/{config.epochs}")
            if world.active:
                loader.sampler.set_epoch(epoch)
            for images, targets in loader:
                done = step / total
                if config.max_minutes:
                    used = (time.monotonic() - started) / (60 * config.max_minutes)
                    # every process must stop at the same step, whichever clock runs out first
                    if any_rank(world, used >= 1)[0]:
                        break
                    done = max(done, used)
                for group in optimizer.param_groups:
                    group["lr"] = config.scaled_lr() * lr_factor(step, config.warmup_iters, done)
                with autocast("bf16" if config.bf16 else "fp32"):
                    losses = trained(list(images), list(targets))
                values = {name: value.item() for name, value in losses.items()}
                bad = [name for name, value in values.items() if not math.isfinite(value)]
                if any_rank(world, bool(bad))[0]:
                    kept = out / "last.pt"
                    raise NonFiniteLoss(
                        f"non-finite {', '.join(bad)} at step {step} ({values}); stopped before "
                        f"the update; last good checkpoint: "
                        f"{kept if kept.exists() else 'none yet'}"
                    )
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                last = {"loss": sum(values.values()), **values}
                log.write(
                    json.dumps(
                        {
                            "epoch": epoch,
                            "step": step,
                            "lr": optimizer.param_groups[0]["lr"],
                            **last,
                        }
                    )
                    + "\n"
                )
                progress.update(
                    task,
                    advance=1,
                    losses=" ".join(
                        f"{name.removeprefix('loss_')}={values[name]:.3f}"
                        for name in LOSS_NAMES
                        if name in values
                    ),
                )
            else:
                if world.is_main:
                    save_checkpoint(
                        out / "last.pt",
                        _payload(model, ema, optimizer, config, epoch + 1, step, dataset, rescorer),
                    )
                console.print(
                    f"epoch {epoch + 1}: step {step}, "
                    + ", ".join(f"{k}={v:.4f}" for k, v in last.items())
                )
                continue
            # the time budget ran out inside this epoch: keep the work, record the epoch as
            # unfinished
            if world.is_main:
                save_checkpoint(
                    out / "last.pt",
                    _payload(model, ema, optimizer, config, epoch, step, dataset, rescorer),
                )
            console.print(
                f"time budget of {config.max_minutes} min spent at step {step} "
                f"(epoch {epoch + 1} of {config.epochs})"
            )
            break
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return last


@torch.no_grad()
def _detect(
    model,
    images: list[torch.Tensor],
    bf16: bool,
    flip: bool,
    scales: Sequence[float],
    refine: bool = False,
    rescorer=None,
) -> list[dict]:
    with autocast("bf16" if bf16 else "fp32"):
        if flip or refine or tuple(scales) != (1.0,):
            outputs = detect_averaged(model, images, scales, flip, refine)
        else:
            outputs = model(images)
    return outputs if rescorer is None else rescorer.rescore(outputs, images, bf16)


def predict_dataset(
    model,
    dataset: CocoDetection,
    batch_size: int = 4,
    bf16: bool = False,
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
        outputs = _detect(model, list(images), bf16, flip, scales, refine, rescorer)
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


def _cocoeval(ground_truth: dict, results: Sequence[dict]) -> COCOeval | None:
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(list(results)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_evaluate(ground_truth: dict, results: Sequence[dict]) -> dict:
    """COCO box AP through pycocotools ``COCOeval``: mAP@[.5:.95], mAP@.5 and AP per class,
    with :func:`error_breakdown`'s keys beside them."""
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    evaluator = _cocoeval(ground_truth, results)
    if evaluator is None:
        metrics = {
            "mAP": 0.0,
            "mAP50": 0.0,
            "mAP75": 0.0,
            "per_class": dict.fromkeys(names.values(), 0.0),
        }
    else:
        # precision: (IoU thresholds, recall points, categories, area ranges, max detections)
        precision = evaluator.eval["precision"]
        per_class = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[names[category_id]] = float(np.mean(p)) if p.size else float("nan")
        stats = evaluator.stats
        metrics = {
            "mAP": float(stats[0]),
            "mAP50": float(stats[1]),
            "mAP75": float(stats[2]),
            "per_class": per_class,
        }
    return {**metrics, "detections": len(results), **error_breakdown(ground_truth, results)}


def _xyxy(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")


def error_breakdown(ground_truth: dict, results: Sequence[dict]) -> dict:
    """Whether a detector's misses come from finding the objects or from naming them.

    - ``class_agnostic_mAP50``: AP@.5 with every box and object of one class, after NMS at
      IoU 0.5 across classes in each image (an object boxed under two labels counts once);
    - ``label_accuracy``: of the objects some detection overlaps at IoU >= 0.5, the share whose
      highest-scoring such detection has the right label; ``found``, ``objects``;
    - ``confusion``: true class -> predicted class -> objects, wrong labels only.
    """
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    objects: dict[int, list[dict]] = {}
    for ann in ground_truth["annotations"]:
        if not ann.get("iscrowd", 0):
            objects.setdefault(ann["image_id"], []).append(ann)
    detections: dict[int, list[dict]] = {}
    for det in results:
        detections.setdefault(det["image_id"], []).append(det)
    kept, found, right = [], 0, 0
    confusion: dict[str, dict[str, int]] = {}
    for image_id, dets in detections.items():
        boxes = _xyxy([d["bbox"] for d in dets])
        scores = torch.tensor([d["score"] for d in dets], dtype=torch.float32)
        kept += [{**dets[k], "category_id": 1} for k in nms(boxes, scores, 0.5).tolist()]
        anns = objects.get(image_id, [])
        if not anns:
            continue
        overlaps = box_iou(_xyxy([a["bbox"] for a in anns]), boxes) >= 0.5
        for ann, hits in zip(anns, overlaps, strict=True):
            if not hits.any():
                continue
            found += 1
            best = dets[int(torch.where(hits, scores, -1.0).argmax())]
            if best["category_id"] == ann["category_id"]:
                right += 1
            else:
                row = confusion.setdefault(names[ann["category_id"]], {})
                label = names[best["category_id"]]
                row[label] = row.get(label, 0) + 1
    one_class = {
        "images": ground_truth["images"],
        "annotations": [{**a, "category_id": 1} for a in ground_truth["annotations"]],
        "categories": [{"id": 1, "name": "object"}],
    }
    evaluator = _cocoeval(one_class, kept)
    return {
        "class_agnostic_mAP50": 0.0 if evaluator is None else float(evaluator.stats[1]),
        "objects": sum(len(anns) for anns in objects.values()),
        "found": found,
        "label_accuracy": right / found if found else 0.0,
        "confusion": confusion,
    }


def evaluate_detector(
    model,
    dataset: CocoDetection,
    batch_size: int = 4,
    bf16: bool = False,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    refine: bool = False,
    rescorer=None,
) -> dict:
    return coco_evaluate(
        dataset.coco,
        predict_dataset(model, dataset, batch_size, bf16, flip, scales, refine, rescorer),
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
    bf16: bool = False,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    refine: bool = False,
    rescorer=None,
) -> list[dict]:
    """Detect on image files; write ``out/<name>.png`` with boxes drawn and return the records."""
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in map(Path, paths):
        image = read_image(path, scale=False)
        output = _detect(model, [image.float() / 255], bf16, flip, scales, refine, rescorer)[0]
        keep = output["scores"] >= score_thresh
        boxes = output["boxes"][keep].float()
        labels = [class_names[i - 1] for i in output["labels"][keep].tolist()]
        scores = output["scores"][keep].float().tolist()
        drawn = draw_bounding_boxes(
            image,
            boxes,
            labels=[f"{n} {s:.2f}" for n, s in zip(labels, scores, strict=True)],
            colors="red",
            width=1,
        )
        drawn_path = out / f"{path.stem}.png"
        write_png(drawn, str(drawn_path))
        records.append(
            {
                "image": str(path),
                "drawn": str(drawn_path),
                "detections": [
                    {"label": n, "score": round(s, 4), "box_xyxy": [round(v, 1) for v in b]}
                    for n, s, b in zip(labels, scores, boxes.tolist(), strict=True)
                ],
            }
        )
    return records
