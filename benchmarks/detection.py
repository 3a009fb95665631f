"""C4 Faster R-CNN benchmarks: accuracy within a CPU time budget, and inference speed.

    .venv/bin/python benchmarks/detection.py train --minutes 30
    .venv/bin/python benchmarks/detection.py infer --rounds 3

``train`` writes the Fashion-MNIST scenes (if not there), trains a C4 detector from scratch
for at most ``--minutes`` of wall-clock time (the schedule anneals within it) and scores COCO
mAP on the val split. ``infer`` times ResNet-101-C4 on a 512x512 image next to the same network
assembled by hand from torchvision's own resnet101, in alternating rounds in one process. Random
weights make the RPN's output arbitrary, so both are fed the same 1000 fixed proposals after
running their RPN: the 1000 RoIs that reach the res5 head, as with trained weights, are what
costs (a forward hook counts them). Where the CPU has VNNI (or with ``--int8 yes``), ``infer``
also times the int8 res5 head (`detect eval|predict --int8`); where it has VNNI ``train`` also
scores it. Each writes
benchmarks/results/detection-<kind>-<time>.json with the machine and the load average before
and after, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from reslab import fast
from reslab.bench import machine_info
from reslab.data.coco import CocoDetection, eval_transforms
from reslab.data.scenes import SceneConfig, make_scenes
from reslab.engine.box_pretrain import crop_accuracy, detector_crops
from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.coco_eval import coco_evaluate, report_metrics
from reslab.engine.detect_config import (
    DetectConfig,
    anchor_sizes,
    check_probability,
    iou_list,
    proposal_settings,
    scale_factors,
    validate,
)
from reslab.engine.detect_infer import (
    predict_dataset,
    prepare_detector_for_inference,
    quantize_detector_head,
)
from reslab.engine.detect_train import (
    prepare,
    relaunch_as,
    report_start,
    resolve_train_precision,
    warm_starts,
)
from reslab.engine.detection import detector_from_checkpoint, train_detector
from reslab.engine.distributed import World, cpu_cores, in_launched_world, init_world
from reslab.engine.rescore import Rescorer, rescorer_accuracy
from reslab.errors import ReslabError
from reslab.models.detection import DetectorConfig, RoIHeadsConfig, RPNConfig, build_detector
from reslab.precision import bf16_supported
from reslab.quantize import int8_pays

RESULTS = Path(__file__).parent / "results"


def write_result(kind: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"detection-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def ensure_scenes(folder: Path, config: SceneConfig, flag: str) -> None:
    """Make the scenes in ``folder`` unless there; stop if they were made otherwise."""
    val_json = folder / "annotations" / "val.json"
    if not val_json.is_file():
        make_scenes(folder, config)
    made = json.loads(val_json.read_text()).get("info", {}).get("config")
    if made != asdict(config):
        raise SystemExit(
            f"detection.py: error: {folder} holds scenes made with {made}, not "
            f"{asdict(config)} as asked; give another {flag} or remove that folder"
        )


def train_config(args) -> DetectConfig:
    """The run `reslab detect train` would make of these flags, built and checked by the
    engine; the scenes are resized so that their side is --min-size (0: kept as made)."""
    side = args.min_size or args.size
    rpn, roi_heads = proposal_settings(vars(args))
    recipe = ("epochs", "batch_size", "lr", "warmup_iters", "ema", "seed")
    warm = ("pretrain_minutes", "pretrain_jitter", "rescore_minutes")
    config = {
        "data": {"data": args.scenes},
        "out": args.out,
        "model": {
            "backbone": args.backbone,
            "width": args.width,
            "min_size": side,
            "max_size": side,
            "rpn": rpn,
            "roi_heads": roi_heads,
        },
        "train": {**{k: getattr(args, k) for k in recipe}, "max_minutes": args.minutes},
        "warm": {k: getattr(args, k) for k in warm},
        "precision": args.precision,
        "processes": args.processes,
        "threads": args.threads or 0,
    }
    return validate(DetectConfig.from_dict(config))


def val_scenes(config: DetectConfig, transforms=None) -> CocoDetection:
    return config.data.dataset("val", transforms)


def train_warm_starts(config: DetectConfig, precision: str, console: Console) -> None:
    """The warm starts as `detect train` trains them, each scored on the val scenes' boxes
    outside the budget."""

    def rescorer_scored(rescorer, record: dict) -> None:
        record["val_crop_accuracy"] = rescorer_accuracy(rescorer, val_scenes(config))
        console.print(
            f"rescoring classifier: {record['val_crop_accuracy']:.1%} of the val scenes' "
            "ground-truth boxes named right"
        )

    def pretrained_scored(model, record: dict) -> None:
        record["val_crop_accuracy"] = crop_accuracy(
            model, *detector_crops(model, val_scenes(config))
        )
        console.print(
            f"pretrained classifier: {record['val_crop_accuracy']:.1%} of the val scenes' "
            "ground-truth crops named right"
        )

    warm_starts(config, precision, console, rescorer_scored, pretrained_scored)


def run_train(args, console: Console) -> None:
    info = machine_info()
    scene_config = SceneConfig(images=args.images, size=args.size, seed=args.seed)
    # before any rank starts, so none of them races
    ensure_scenes(Path(args.scenes), scene_config, "--scenes")
    config = train_config(args)
    precision = config.precision
    if not in_launched_world():
        precision = resolve_train_precision(config, console, World())
        train_warm_starts(config, precision, console)
    # with --processes N this script runs again as N ranks of one DDP world, as `reslab
    # detect train --processes` does; rank 0 evaluates and writes the result
    code = relaunch_as(args.processes or cpu_cores(), None, args.threads or 0, precision)
    if code is not None:
        raise SystemExit(code)
    world = init_world()
    if not world.is_main:
        console = Console(quiet=True)
    prepared = prepare(config, precision, console)
    report_start(prepared, world, console)
    started = time.monotonic()
    last = train_detector(
        prepared.model,
        prepared.dataset,
        prepared.train,
        args.out,
        console=console,
        world=world,
        rescorer=prepared.rescorer,
    )
    train_s = time.monotonic() - started
    if not world.is_main:
        return
    steps = sum(1 for _ in (Path(args.out) / "log.jsonl").open())
    val = val_scenes(config, eval_transforms())
    evaluations = evaluate_trained(args, prepared, val)
    result = {
        "kind": "train",
        "machine": info,
        "load_average_end": os.getloadavg(),
        "scenes": asdict(scene_config),
        "train_images": len(prepared.dataset),
        "val_images": len(val),
        "detector": asdict(prepared.detector),
        "train": asdict(prepared.train),
        "processes": world.size,
        "steps": steps,
        "train_minutes": train_s / 60,
        "eval_seconds": evaluations.pop("eval_seconds"),
        "last_losses": last,
        **evaluations,
        "pretrain": prepared.pretrain,
        "rescorer": prepared.rescorer["record"] if prepared.rescorer else None,
        "note": args.note,
    }
    report_train(args, console, result)
    console.print(f"wrote {write_result('train', result)}")


def evaluate_trained(args, prepared, val: CocoDetection) -> dict:
    """The plain evaluation and, as asked, the int8-head, flip, views and refined ones."""
    model, saved = prepared.model, prepared.rescorer
    rescorer = Rescorer.from_payload(saved) if saved else None
    started = time.monotonic()
    metrics = scored(val, predict_dataset(model, val, batch_size=8), rescorer)
    found = {"eval_seconds": time.monotonic() - started, "metrics": metrics}
    found["metrics_int8_head"] = None
    if int8_pays():  # what `detect eval --int8` scores: the folded detector, int8 res5 head
        fast_model = prepare_detector_for_inference(copy.deepcopy(model))
        calibration = range(min(16, len(prepared.dataset)))
        quantize_detector_head(fast_model, [prepared.dataset[i][0] for i in calibration])
        started = time.monotonic()
        int8 = scored(val, predict_dataset(fast_model, val, batch_size=8), rescorer)
        int8["eval_seconds"] = time.monotonic() - started
        found["metrics_int8_head"] = int8
    views = {"flip": args.flip, "scales": args.scales}
    found["metrics_flip"] = found["metrics_views"] = found["metrics_refined"] = None
    if args.flip:  # what `detect eval --flip` scores: fp32, the head averaged with the mirror
        found["metrics_flip"] = evaluate_views(model, val, args.low_score, rescorer, flip=True)
    if args.scales != (1.0,):  # `detect eval --flip --scales ...`: each scale and its mirror
        found["metrics_views"] = evaluate_views(model, val, args.low_score, rescorer, **views)
        found["metrics_views"]["scales"] = list(args.scales)
    if args.refine:  # `detect eval --refine` with the same views
        refined = evaluate_views(model, val, args.low_score, rescorer, **views, refine=True)
        found["metrics_refined"] = {**refined, "scales": list(args.scales)}
    return found


def report_train(args, console: Console, result: dict) -> None:
    metrics, eval_s = result["metrics"], result["eval_seconds"]
    report_metrics(
        console,
        metrics,
        f"C4 detector from scratch, {args.backbone} x{args.width}, "
        f"{result['train_minutes']:.1f} min, {result['steps']} steps",
    )
    report_not_rescored(console, metrics)
    int8 = result["metrics_int8_head"]
    if int8:
        console.print(
            f"int8 res5 head (`detect eval --int8`): mAP {int8['mAP']:.3f}, "
            f"mAP@.5 {int8['mAP50']:.3f}; eval {int8['eval_seconds']:.0f} s "
            f"against {eval_s:.0f} s in fp32 (unfolded)"
        )
    view_flags = ("--flip " if args.flip else "") + "--scales " + ",".join(map(str, args.scales))
    for views, flags, title in (
        (result["metrics_flip"], "--flip", "mirror-averaged head"),
        (result["metrics_views"], view_flags, "the head averaged over views"),
        (
            result["metrics_refined"],
            view_flags + " --refine",
            "the head over views, run again where it moved the boxes",
        ),
    ):
        if not views:
            continue
        report_metrics(
            console,
            views,
            f"the same, {title} (`detect eval {flags}`), {views['eval_seconds']:.0f} s",
        )
        report_not_rescored(console, views)
        if "low_score" in views:
            low = views["low_score"]
            console.print(
                f"  with `--score-thresh {args.low_score:g}` as well: mAP {low['mAP']:.3f}, "
                f"mAP@.5 {low['mAP50']:.3f}, {low['detections']:,} detections"
            )
            report_not_rescored(console, low)


def run_nms(args, console: Console) -> None:
    """Choose the box NMS threshold on scenes the detector was not scored on, then score the
    val split once with it: the val split stays untouched by the choice."""
    tune_config = SceneConfig(images=args.tune_images, size=args.size, seed=args.tune_seed)
    tune_dir = Path(args.tune_scenes)
    ensure_scenes(tune_dir, tune_config, "--tune-scenes")
    # the tuning scenes' train split: new canvases of Fashion-MNIST training items, so none
    # of the val split's (test-set) items, in layouts the detector never saw
    tune = CocoDetection(
        tune_dir / "train", tune_dir / "annotations" / "train.json", eval_transforms()
    )
    scenes = Path(args.scenes)
    val = CocoDetection(scenes / "val", scenes / "annotations" / "val.json", eval_transforms())
    model = detector_from_checkpoint(load_checkpoint(args.checkpoint))
    info = machine_info()
    tuning = {}
    for iou in args.thresholds:
        model.roi_heads.nms_thresh = iou
        metrics = evaluate_views(model, tune, args.low_score)
        tuning[str(iou)] = metrics
        console.print(
            f"tuning scenes, plain, NMS {iou:g}: mAP@.5 {metrics['mAP50']:.4f}, at "
            f"--score-thresh {args.low_score:g} {low_or_kept(metrics)['mAP50']:.4f} "
            f"({metrics['eval_seconds']:.0f} s)"
        )
    chosen = max(args.thresholds, key=lambda iou: low_or_kept(tuning[str(iou)])["mAP50"])
    model.roi_heads.nms_thresh = chosen
    views = dict(flip=args.flip, scales=args.scales, refine=args.refine)
    metrics = evaluate_views(model, val, args.low_score, **views)
    result = {
        "kind": "nms",
        "machine": info,
        "load_average_end": os.getloadavg(),
        "checkpoint": str(args.checkpoint),
        "tune_scenes": {**asdict(tune_config), "split": "train", "images": len(tune)},
        "val_images": len(val),
        "tuning": tuning,
        "chosen_nms": chosen,
        "views": {**views, "scales": list(args.scales)},
        "metrics": metrics,
        "note": args.note,
    }
    flags = (" --flip" if args.flip else "") + " --scales " + ",".join(map(str, args.scales))
    flags += " --refine" if args.refine else ""
    report_metrics(console, metrics, f"val, NMS {chosen:g} (chosen on the tuning scenes),{flags}")
    low = low_or_kept(metrics)
    console.print(
        f"  with `--score-thresh {args.low_score:g}`: mAP {low['mAP']:.3f}, "
        f"mAP@.5 {low['mAP50']:.4f}; {metrics['eval_seconds']:.0f} s"
    )
    console.print(f"wrote {write_result('nms', result)}")


def low_or_kept(metrics: dict) -> dict:
    """:func:`evaluate_views`' metrics at its low score threshold, if it scored one."""
    return metrics.get("low_score", metrics)


def report_not_rescored(console: Console, metrics: dict) -> None:
    if "not_rescored" in metrics:
        own = metrics["not_rescored"]
        console.print(
            f"  (the detector's own scores, not rescored: mAP {own['mAP']:.3f}, "
            f"mAP@.5 {own['mAP50']:.3f}, {own['label_accuracy']:.1%} labelled right)"
        )


def scored(val, results: list[dict], rescorer: Rescorer | None) -> dict:
    """COCO metrics of detections, rescored when there is a rescorer, the detector's own
    under ``not_rescored``."""
    return scored_as(val, results, rescorer and rescorer.rescore_results(results, val))


def scored_as(val, results: list[dict], rescored: list[dict] | None) -> dict:
    """:func:`scored` with the detections already rescored (``rescored``, in the same order;
    None: not rescored)."""
    if rescored is None:
        return coco_evaluate(val.coco, results)
    metrics = coco_evaluate(val.coco, rescored)
    metrics["not_rescored"] = coco_evaluate(val.coco, results)
    return metrics


def evaluate_views(model, val, low_score: float, rescorer=None, **views) -> dict:
    """What `detect eval` scores with these views, at the checkpoint's own score threshold and,
    under ``low_score``, at that `--score-thresh` too, from one pass over the val images.

    A score threshold only drops detections below it, and the per-class NMS keeps a box
    whatever boxes of a lower score do, so the detections at the checkpoint's threshold are
    those at the lower one with the scores below it taken out (the 100 per image that a
    scene with at most 6 objects never fills aside).
    """
    model = prepare_detector_for_inference(copy.deepcopy(model))
    kept = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = min(kept, low_score)
    started = time.monotonic()
    results = predict_dataset(model, val, batch_size=8, **views)
    seconds = time.monotonic() - started
    # a detection's rescored score depends on it alone: rescore once, then keep by threshold
    rescored = rescorer and rescorer.rescore_results(results, val)
    keep = [k for k, r in enumerate(results) if r["score"] >= kept]
    metrics = scored_as(val, [results[k] for k in keep], rescored and [rescored[k] for k in keep])
    metrics["eval_seconds"] = seconds
    if low_score < kept:
        metrics["low_score"] = {"score_thresh": low_score, **scored_as(val, results, rescored)}
    return metrics


def torchvision_c4(num_classes: int, size: int, proposals: int) -> FasterRCNN:
    """ResNet-101-C4 assembled by hand from torchvision's resnet101, as its detection code does
    for FPN backbones: frozen batch norm, conv1..layer3 as the trunk, layer4 per RoI."""
    resnet = torchvision.models.resnet101(norm_layer=FrozenBatchNorm2d)
    trunk = nn.Sequential(
        resnet.conv1,
        resnet.bn1,
        resnet.relu,
        resnet.maxpool,
        resnet.layer1,
        resnet.layer2,
        resnet.layer3,
    )
    trunk.out_channels = 1024
    head = nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return FasterRCNN(
        trunk,
        min_size=size,
        max_size=size,
        rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_test=6000,
        rpn_post_nms_top_n_test=proposals,
        box_roi_pool=MultiScaleRoIAlign(["0"], 14, 0),
        box_head=head,
        box_predictor=FastRCNNPredictor(2048, num_classes),
    )


def fixed_proposals(count: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sides = 32 + torch.rand(count, 2, generator=g) * 224
    corners = torch.rand(count, 2, generator=g) * (size - sides)
    return torch.cat([corners, corners + sides], 1)  # (count, 4) xyxy


class RoICounter:
    def __init__(self, model: FasterRCNN):
        self.count = 0
        model.roi_heads.box_head.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.count = len(inputs[0])  # pooled RoIs, or PendingRoIs on the fast path


@torch.inference_mode()
def detect(
    model: FasterRCNN, image: torch.Tensor, proposals: torch.Tensor, precision: str = "fp32"
) -> dict:
    """GeneralizedRCNN.forward with the RPN's proposals replaced by fixed ones; times each part.

    ``precision`` "bf16" runs it under the autocast `detect eval|predict --bf16` use.
    """
    start = time.perf_counter()
    with fast.autocast(precision):
        images, _ = model.transform([image])
        features = {"0": model.backbone(images.tensors)}  # (1, 1024, H/16, W/16)
        rpn_proposals, _ = model.rpn(images, features)
        trunk_s = time.perf_counter() - start
        detections, _ = model.roi_heads(features, [proposals], images.image_sizes)
        model.transform.postprocess(detections, images.image_sizes, [tuple(image.shape[-2:])])
    total_s = time.perf_counter() - start
    return {
        "total_s": total_s,
        "trunk_rpn_s": trunk_s,
        "head_s": total_s - trunk_s,
        "rpn_proposals": len(rpn_proposals[0]),
    }


def infer_variants(args, console: Console) -> tuple[dict, dict]:
    """The networks timed, by name, and the autocast precision of those not in fp32."""
    torch.manual_seed(0)
    size = args.size
    ours = build_detector(
        DetectorConfig(
            num_classes=91,
            frozen_bn=True,
            freeze_at=2,
            min_size=size,
            max_size=size,
            rpn=RPNConfig(post_nms_top_n_test=args.proposals),
        )
    )

    def prepared_copy() -> FasterRCNN:  # what `detect eval|predict` run
        twin = build_detector(DetectorConfig.from_dict(ours.spec["kwargs"]))
        twin.load_state_dict(ours.state_dict())
        return prepare_detector_for_inference(twin)

    ours_fast = prepared_copy()
    variants = {
        "torchvision resnet101 C4 (hand-assembled)": torchvision_c4(91, size, args.proposals),
        "reslab resnet101 C4": ours,
        "reslab resnet101 C4, folded BN + channels_last": ours_fast,
    }
    precisions = {}
    if bf16_supported():  # without native bf16 it is many times slower; not worth timing
        bf16_name = "reslab resnet101 C4, folded BN + channels_last, bf16 (--precision bf16)"
        variants[bf16_name] = ours_fast
        precisions[bf16_name] = "bf16"
    if args.int8 == "yes" or (args.int8 == "auto" and int8_pays()):
        ours_int8 = prepared_copy()
        # calibrated on another random image through the same fixed proposals as the timing
        calibration = fixed_proposals(args.proposals, size, seed=1)
        started = time.perf_counter()
        quantize_detector_head(
            ours_int8,
            [torch.rand(3, size, size)],
            run=lambda model, image: detect(model, image, calibration),
        )
        console.print(f"int8 head calibrated in {time.perf_counter() - started:.1f} s")
        variants["reslab resnet101 C4, folded BN, int8 res5 head (--int8)"] = ours_int8
    return variants, precisions


def run_infer(args, console: Console) -> None:
    info = machine_info()
    size = args.size
    variants, precisions = infer_variants(args, console)
    counters = {}
    for name, model in variants.items():
        model.eval()
        counters[name] = RoICounter(model)
    image = torch.rand(3, size, size)
    proposals = fixed_proposals(args.proposals, size)
    for name, model in variants.items():  # warm-up: first-call allocations, kernel selection
        detect(model, image, proposals[:50], precisions.get(name, "fp32"))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, model in variants.items():
            run = detect(model, image, proposals, precisions.get(name, "fp32"))
            run["rois"] = counters[name].count
            runs[name].append(run)
            console.print(
                f"round {round_ + 1}: {name}: {run['total_s']:.2f} s "
                f"(trunk+RPN {run['trunk_rpn_s']:.2f}, RoIAlign+res5+predictor "
                f"{run['head_s']:.2f}; {run['rois']} RoIs)"
            )
    summary = {
        name: {
            key: statistics.median(r[key] for r in rs)
            for key in ("total_s", "trunk_rpn_s", "head_s")
        }
        | {"rois": rs[0]["rois"], "rpn_proposals": rs[0]["rpn_proposals"]}
        for name, rs in runs.items()
    }
    table = Table(
        title=f"ResNet-101-C4 inference, {size}x{size}, {args.proposals} RoIs, "
        f"median of {args.rounds}"
    )
    for column in ("network", "s / image", "trunk + RPN", "RoIAlign + res5", "RoIs"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for name, s in summary.items():
        table.add_row(
            name,
            f"{s['total_s']:.2f}",
            f"{s['trunk_rpn_s']:.2f}",
            f"{s['head_s']:.2f}",
            str(s["rois"]),
        )
    console.print(table)
    result = {
        "kind": "infer",
        "machine": info,
        "load_average_end": os.getloadavg(),
        "image_size": size,
        "proposals": args.proposals,
        "rounds": args.rounds,
        "summary": summary,
        "runs": runs,
        "note": args.note,
    }
    console.print(f"wrote {write_result('infer', result)}")


def add_train(actions) -> None:
    train = actions.add_parser(
        "train",
        help="accuracy within a time budget",
        description="Train a C4 detector on the scenes within --minutes and score it on their "
        "val split. The defaults are the best recipe (docs/detection.md): 8,000 scenes "
        "upsampled to 256 px, ResNet-18 at 1/4 width, 8 RoIs per image of which up to 6 "
        "positive, 4 minutes of the rescoring classifier, 6 minutes of box-classifier "
        "pretraining on jittered crops, one process per core, and the flip-averaged, views "
        "and refined evaluations beside the plain one.",
    )
    train.add_argument("--minutes", type=float, default=30.0)
    train.add_argument("--scenes", default="runs/scenes-8000")
    train.add_argument("--images", type=int, default=8000)
    train.add_argument("--size", type=int, default=128)
    train.add_argument(
        "--min-size",
        type=int,
        default=256,
        help="side the detector resizes the scenes to (default %(default)s; 0: --size); 256 "
        "doubles the stride-16 map's resolution of each item",
    )
    train.add_argument("--out", default="runs/detect-bench")
    train.add_argument("--backbone", default="resnet18")
    train.add_argument("--width", type=float, default=0.25)
    train.add_argument("--rois-per-image", type=int, default=8)
    train.add_argument(
        "--roi-positive-fraction",
        type=float,
        default=0.75,
        help="largest share of the sampled RoIs that may be positive (default %(default)s; "
        f"detectron2's {RoIHeadsConfig.positive_fraction})",
    )
    train.add_argument("--test-proposals", type=int, default=100)
    train.add_argument("--anchor-sizes", type=anchor_sizes, default=(32, 64, 128, 256))
    train.add_argument("--train-pre-nms", type=int, default=600)
    train.add_argument("--train-proposals", type=int, default=300)
    add_warm_starts(train)
    add_evaluations(train)
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=0.16)
    train.add_argument("--warmup-iters", type=int, default=100)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="evaluate a moving average of the detector's weights, this decay per step "
        "(`detect train --ema`; default 0: off)",
    )
    train.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="fp32",
        help="pretraining and training precision (`detect train --precision`; default "
        "%(default)s); the evaluation stays fp32",
    )
    train.add_argument(
        "--processes",
        type=int,
        default=0,
        help="DDP ranks on this machine, each with its share of the cores (0: one per core)",
    )


def add_warm_starts(train) -> None:
    train.add_argument(
        "--pretrain-minutes",
        type=float,
        default=6.0,
        help="first train the trunk, res5 head and class scores as a classifier on crops "
        "around the training boxes for this long, within --minutes (reslab.engine.box_pretrain)",
    )
    train.add_argument(
        "--rescore-minutes",
        type=float,
        default=4.0,
        help="first train the rescoring classifier on windows around the training boxes for "
        "this long, within --minutes (`detect train --rescore-minutes`, reslab.engine.rescore); "
        "every evaluation is then scored rescored and, under not_rescored, without (0: none)",
    )
    train.add_argument(
        "--pretrain-jitter",
        type=float,
        default=0.1,
        help="move each crop box's edges at random by up to this share of its size "
        "(default %(default)s)",
    )


def add_evaluations(train) -> None:
    train.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate with the box head averaged over each val image and its mirror "
        "(default: on)",
    )
    train.add_argument(
        "--scales",
        type=scale_factors,
        default=(1.0, 1.125, 1.25),
        metavar="F,F,...",
        help="also evaluate with the box head averaged over the val images resized by these "
        "factors (and their mirrors with --flip), as `detect eval --scales` (default 1,1.125,1.25; "
        "1: skip this evaluation)",
    )
    train.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate with those views and the head run again at the boxes it moved "
        "the proposals to, as `detect eval --refine` (default: on)",
    )
    train.add_argument(
        "--low-score",
        type=float,
        default=0.001,
        metavar="P",
        help="also score the flip and views evaluations with detections down to this class "
        "probability, as `detect eval --score-thresh P` (default %(default)s, the threshold "
        "COCO evaluations often use; from the same pass)",
    )


def add_infer(actions) -> None:
    infer = actions.add_parser("infer", help="ResNet-101-C4 seconds per image")
    infer.add_argument("--size", type=int, default=512)
    infer.add_argument("--proposals", type=int, default=1000)
    infer.add_argument("--rounds", type=int, default=3)
    infer.add_argument(
        "--int8",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also time the int8 res5 head: auto = where the CPU has VNNI (default), yes = "
        "also without it (AVX2's 8-bit multiply-adds), no = never",
    )


def add_nms(actions) -> None:
    nms = actions.add_parser(
        "nms",
        help="choose the box NMS threshold on held-out scenes, then score val with it",
        description="Score a trained detector's plain evaluation at each --thresholds box NMS "
        "IoU on tuning scenes (the train split of scenes made with --tune-seed: Fashion-MNIST "
        "training items in new layouts), take the best mAP@.5 at --low-score, and score the "
        "val split once with it and the test-time views given.",
    )
    nms.add_argument("checkpoint", help="a detector checkpoint or its run folder")
    nms.add_argument("--scenes", default="runs/scenes-8000", help="the scenes scored (val)")
    nms.add_argument("--tune-scenes", default="runs/scenes-tune")
    nms.add_argument("--tune-images", type=int, default=1600)
    nms.add_argument("--tune-seed", type=int, default=1)
    nms.add_argument("--size", type=int, default=128)
    nms.add_argument(
        "--thresholds",
        type=iou_list,
        default=(0.3, 0.4, 0.5, 0.6),
        metavar="IOU,IOU,...",
        help="box NMS IoU thresholds to try (default 0.3,0.4,0.5,0.6; 0.5 is detectron2's)",
    )
    nms.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    nms.add_argument("--scales", type=scale_factors, default=(1.0, 1.125, 1.25))
    nms.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True)
    nms.add_argument("--low-score", type=float, default=0.001, metavar="P")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)
    for add in (add_train, add_infer, add_nms):
        add(actions)
    for sub in actions.choices.values():
        sub.add_argument("--note", default="", help="free text saved with the results")
        # on a loaded machine, OpenMP threads of one process spin waiting for each other; one
        # thread can then be several times faster than two
        sub.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    try:  # the engine's parsers and rules raise one-line errors
        args = parser.parse_args()
        if args.action == "train":
            train_config(args)
            check_probability("low-score", args.low_score)
    except ReslabError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    {"train": run_train, "infer": run_infer, "nms": run_nms}[args.action](args, console)


if __name__ == "__main__":
    main()
