"""`reslab detect train|eval|predict`: the C4 Faster R-CNN on COCO-format data."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from reslab.data.coco import CocoDetection, eval_transforms, resolve, train_transforms
from reslab.engine.box_pretrain import (
    check_jitter,
    load_warm_start,
    pretrain_box_classifier,
    save_warm_start,
)
from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.detection import (
    DetectTrainConfig,
    check_ema,
    detector_from_checkpoint,
    evaluate_detector,
    predict_images,
    prepare_detector_for_inference,
    quantize_detector_head,
    read_image,
    train_detector,
)
from reslab.engine.distributed import (
    World,
    check_batch,
    cpu_cores,
    in_launched_world,
    init_world,
    relaunch,
)
from reslab.engine.rescore import (
    load_rescorer_payload,
    rescorer_from_checkpoint,
    save_rescorer,
    train_rescorer,
)
from reslab.errors import ReslabError, check_whole, finite_positive
from reslab.models.detection import (
    BACKBONES,
    DetectorConfig,
    RoIHeadsConfig,
    RPNConfig,
    build_detector,
    check_positive_fraction,
    load_backbone_weights,
)
from reslab.quantize import int8_pays

# detectron2's test-time shorter side; smaller datasets (the 128-pixel scenes) keep their size
DEFAULT_MIN_SIZE = 800


def _add_data(parser) -> None:
    parser.add_argument("--data", help="a folder as `reslab scenes make` writes it")
    parser.add_argument("--images", help="image folder of a COCO dataset (with --annotations)")
    parser.add_argument("--annotations", help="COCO JSON annotation file (with --images)")
    _add_threads(parser)


def _add_threads(parser) -> None:
    # on a shared machine one thread avoids OpenMP threads spinning against each other
    parser.add_argument("--threads", type=int, help="CPU threads (per process with --processes)")


def _set_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="Faster R-CNN with a ResNet C4 backbone",
        description="Train, evaluate and run a C4 Faster R-CNN (Ren et al. 2015; detectron2 "
        "Base-RCNN-C4 defaults) on COCO-format data.",
    )
    actions = parser.add_subparsers(metavar="ACTION", required=True)
    defaults = DetectTrainConfig()

    train = actions.add_parser(
        "train",
        help="train a detector",
        description="Train on the train split; checkpoints to OUT/last.pt.",
    )
    _add_data(train)
    train.add_argument("--out", default="runs/detect", help="run folder (default %(default)s)")
    train.add_argument(
        "--backbone",
        default="resnet101",
        choices=BACKBONES,
        help="ResNet depth for the C4 trunk and head (default %(default)s)",
    )
    train.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    train.add_argument(
        "--backbone-weights",
        metavar="FILE",
        help="ImageNet torchvision ResNet state dict; freezes batch norm, stem "
        "and layer1 as detectron2 does",
    )
    train.add_argument(
        "--min-size",
        type=int,
        default=None,
        help=f"shorter image side after resizing (default: the images' own, at "
        f"most {DEFAULT_MIN_SIZE})",
    )
    train.add_argument("--max-size", type=int, default=1333, help="default %(default)s")
    train.add_argument(
        "--rois-per-image",
        type=int,
        default=RoIHeadsConfig.batch_size_per_image,
        help="RoIs sampled per training image; res5 runs on each, so this sets "
        "the cost of a step (default %(default)s)",
    )
    train.add_argument(
        "--roi-positive-fraction",
        type=float,
        default=RoIHeadsConfig.positive_fraction,
        help="largest share of the sampled RoIs that may be positive, the rest "
        "background (default %(default)s, as detectron2)",
    )
    add_anchor_sizes(train)
    add_train_proposals(train)
    train.add_argument(
        "--test-proposals",
        type=int,
        default=RPNConfig.post_nms_top_n_test,
        help="proposals per image at test time (default %(default)s)",
    )
    train.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="passes over the training images; with --max-minutes, at most (default %(default)s)",
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="images per optimizer step, over all --processes (default %(default)s)",
    )
    train.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help="learning rate for 16 images, scaled by batch size (default %(default)s)",
    )
    train.add_argument(
        "--warmup-iters",
        type=int,
        default=defaults.warmup_iters,
        help="steps of linear rise to --lr at the start (default %(default)s)",
    )
    train.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast, the box-classifier pretraining's too: a training step 1.37x "
        "faster than fp32 on an AMD EPYC with AVX512-BF16, slower on a Xeon with it; many times "
        "slower without AVX512-BF16 or AMX",
    )
    train.add_argument(
        "--ema",
        type=float,
        default=defaults.ema,
        metavar="DECAY",
        help="keep a moving average of the weights and batch-norm statistics, this decay per "
        "step (such as 0.999), and save and evaluate it instead of the last weights "
        "(default 0: off)",
    )
    train.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after the epoch that passes this time (0: no limit)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed for the weights and the order of images (default %(default)s)",
    )
    train.add_argument(
        "--pretrain-minutes",
        type=float,
        default=0.0,
        metavar="M",
        help="first train trunk, res5 head and class layer as a classifier on crops around the "
        "training boxes for M minutes, part of --max-minutes (default 0: none; 6 of 30 "
        "raised mAP@.5 from 0.865 to 0.877 on the scenes)",
    )
    train.add_argument(
        "--pretrain-jitter",
        type=float,
        default=0.0,
        metavar="F",
        help="with --pretrain-minutes: move each crop box's edges at random by up to F of its "
        "width or height every time it is drawn, like proposals near the object (default 0)",
    )
    train.add_argument(
        "--rescore-minutes",
        type=float,
        default=0.0,
        metavar="M",
        help="first train a small classifier on windows of the image around the training "
        "boxes for M minutes, part of --max-minutes; eval and predict multiply each "
        "detection's score by its probability of the detection's label (decoupled "
        "classification refinement; default 0: none)",
    )
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="train in N local processes with DistributedDataParallel (0: one per core), each "
        "with its share of the cores; --batch-size stays the global batch (default 1)",
    )
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser(
        "eval", help="COCO mAP of a checkpoint", description="COCO box AP (pycocotools COCOeval)."
    )
    evaluate.add_argument("checkpoint", help="a detector checkpoint or its run folder")
    _add_data(evaluate)
    evaluate.add_argument("--split", default="val", help="with --data (default %(default)s)")
    evaluate.add_argument(
        "--batch-size", type=int, default=4, help="images per forward pass (default %(default)s)"
    )
    _add_precision(
        evaluate, "the train split's first N images with --data, else the first N evaluated"
    )
    _add_scoring(evaluate)
    evaluate.add_argument(
        "--score-thresh",
        type=float,
        metavar="P",
        help="keep detections whose class probability is at least P (default: the "
        "checkpoint's, 0.05 as in detectron2; COCO evaluations often use 0.001, which lets a "
        "mislabelled object's right class in at a low score)",
    )
    _add_nms(evaluate)
    evaluate.add_argument("--json", metavar="FILE", help="also write the metrics here")
    evaluate.set_defaults(func=run_eval)

    predict = actions.add_parser(
        "predict",
        help="detect objects in images",
        description="Draw detections on each image and write JSON.",
    )
    predict.add_argument("checkpoint", help="a detector checkpoint or its run folder")
    predict.add_argument("image", nargs="+", help="PNG or JPEG files")
    predict.add_argument("--out", default="predictions", help="default %(default)s")
    predict.add_argument(
        "--score-thresh",
        type=float,
        default=0.5,
        metavar="P",
        help="draw and list only detections whose class probability is at least P "
        "(default %(default)s; below the checkpoint's own test threshold, 0.05 as in "
        "detectron2, the model is asked to keep them too)",
    )
    _add_precision(predict, "the first N of the given images")
    _add_scoring(predict)
    _add_nms(predict)
    _add_threads(predict)
    predict.set_defaults(func=run_predict)


def _add_nms(parser) -> None:
    parser.add_argument(
        "--nms",
        type=float,
        metavar="IOU",
        help="drop a detection that overlaps a higher-scoring one of its class by more than "
        "this IoU (default: the checkpoint's, 0.5 as in detectron2)",
    )


def _set_nms(model, iou: float | None) -> None:
    if iou is not None:
        model.roi_heads.nms_thresh = iou


def _add_scoring(parser) -> None:
    """How eval and predict score each detection: the views the box head averages over, a
    second head pass, and the checkpoint's rescoring classifier or not."""
    parser.add_argument(
        "--flip",
        action="store_true",
        help="average the box head over each image and its mirror image (class probabilities "
        "and box shifts per proposal): test-time flip averaging; the trunk and head run twice",
    )
    parser.add_argument(
        "--scales",
        type=scale_factors,
        default=(1.0,),
        metavar="F,F,...",
        help="also average the box head over the image resized by these factors, the RPN's "
        "proposals scaled with it (default 1: the image as the model resizes it); with --flip "
        "each scale and its mirror. With --flip, 1,1.125,1.25 raised the scenes' best detector "
        "from 0.888 to 0.895 mAP@.5; the trunk and head run once per view",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="run the box head a second time at the boxes it moved each proposal to (over "
        "the same views) and average the two passes' class probabilities, the boxes taking "
        "the second pass's shifts: iterative box regression; the head runs twice",
    )
    parser.add_argument(
        "--no-rescore",
        action="store_true",
        help="leave the scores as the detector gives them when the checkpoint has a rescoring "
        "classifier (detect train --rescore-minutes); by default it rescores",
    )


def _rescorer(args, payload: dict):
    """The checkpoint's rescoring classifier unless --no-rescore; None without one."""
    return None if args.no_rescore else rescorer_from_checkpoint(payload)


def _numbers(text: str, most: float, what: str, example: str) -> tuple[float, ...]:
    """Comma-separated numbers, each above 0 and at most ``most``, for an argparse type."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < value <= most for value in values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of {what}; give numbers above 0 and at most {most:g}, "
            f"comma-separated, such as {example}"
        )
    return values


def scale_factors(text: str) -> tuple[float, ...]:
    """argparse type for ``--scales``: resize factors in (0, 4], comma-separated."""
    return _numbers(text, 4, "resize factors", "1,1.25")


def iou_list(text: str) -> tuple[float, ...]:
    """argparse type for a list of IoU thresholds in (0, 1], comma-separated."""
    return _numbers(text, 1, "IoU thresholds", "0.4,0.5")


def _add_precision(parser, calibration: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast: ResNet-101-C4 took 0.5x the folded fp32 time on an AMD EPYC "
        "with AVX512-BF16, 1.3-1.5x on a Xeon with it; many times slower without AVX512-BF16 "
        "or AMX",
    )
    group.add_argument(
        "--int8",
        action="store_true",
        help="int8 res5 box head (post-training quantization; the trunk stays fp32): several "
        "times faster on CPUs with VNNI, at some cost in accuracy",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=16,
        metavar="N",
        help=f"with --int8: images whose RoIs fix the int8 scales: {calibration} "
        "(default %(default)s)",
    )


def _quantize(model, images: Sequence[torch.Tensor], console: Console) -> None:
    if not int8_pays():
        console.print("note: this CPU has no VNNI; int8 convolutions may be slower than fp32")
    started = time.perf_counter()
    rois = quantize_detector_head(model, images)
    console.print(
        f"int8 res5 head calibrated on {len(images)} images ({rois} RoIs) "
        f"in {time.perf_counter() - started:.1f} s"
    )


def _check_inference_args(args) -> None:
    """The flags `detect eval` and `detect predict` share."""
    check_whole("calibration-images", args.calibration_images)
    if hasattr(args, "batch_size"):
        check_whole("batch-size", args.batch_size)
    if getattr(args, "score_thresh", None) is not None and not 0 <= args.score_thresh <= 1:
        raise ReslabError(
            f"--score-thresh is a class probability, from 0 to 1; got {args.score_thresh:g}"
        )
    if args.nms is not None and not 0 < args.nms <= 1:
        raise ReslabError(f"--nms is an IoU above 0 and at most 1; got {args.nms:g}")


def _first_images(dataset: CocoDetection, count: int) -> list[torch.Tensor]:
    return [dataset[i][0] for i in range(min(count, len(dataset)))]


def _dataset(args, split: str, transforms) -> CocoDetection:
    images, annotations = resolve(args.data, args.images, args.annotations, split)
    return CocoDetection(images, annotations, transforms)


def anchor_sizes(text: str) -> tuple[int, ...]:
    """argparse type for ``--anchor-sizes``: positive pixel sides, comma-separated, ascending."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0 or list(sizes) != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of anchor sides; give positive whole pixels in "
            "ascending order, comma-separated, such as 16,32,64,128"
        )
    return sizes


def add_anchor_sizes(parser, default: tuple[int, ...] = RPNConfig.anchor_sizes) -> None:
    """--anchor-sizes; ``default`` other than detectron2's for a caller with its own recipe."""
    whose = ", detectron2's, made for 800-pixel images" if default == RPNConfig.anchor_sizes else ""
    parser.add_argument(
        "--anchor-sizes",
        type=anchor_sizes,
        default=default,
        metavar="PX,PX,...",
        help="RPN anchor sides in pixels of the resized image, all on the one stride-16 map "
        f"(default {','.join(map(str, default))}{whose}; small images with small objects want "
        "smaller ones: 16,32,64,128 for the 128-pixel scenes)",
    )


def add_train_proposals(
    parser,
    pre_nms: int = RPNConfig.pre_nms_top_n_train,
    proposals: int = RPNConfig.post_nms_top_n_train,
) -> None:
    """--train-pre-nms and --train-proposals, by default detectron2's 12000 and 2000."""
    whose = ", detectron2's" if pre_nms == RPNConfig.pre_nms_top_n_train else ""
    parser.add_argument(
        "--train-pre-nms",
        type=int,
        default=pre_nms,
        metavar="N",
        help=f"RPN boxes, by objectness, that enter NMS per training image (default {pre_nms}"
        f"{whose}; NMS over a few thousand boxes can be a third of a small-image step)",
    )
    parser.add_argument(
        "--train-proposals",
        type=int,
        default=proposals,
        metavar="N",
        help="proposals kept after NMS per training image, from which the RoIs are "
        f"sampled (default {proposals})",
    )


def _native_min_size(dataset: CocoDetection) -> int:
    return min(DEFAULT_MIN_SIZE, max(min(i["width"], i["height"]) for i in dataset.images))


def _check_train_args(args) -> None:
    for flag, least in (("epochs", 1), ("batch_size", 1), ("warmup_iters", 0), ("max_size", 1)):
        check_whole(flag.replace("_", "-"), getattr(args, flag), least)
    if args.min_size is not None:
        check_whole("min-size", args.min_size)
    finite_positive("lr", args.lr)
    finite_positive("max-minutes", args.max_minutes, allow_zero=True)
    if args.processes < 0:
        raise ReslabError(f"--processes must be >= 0, got {args.processes}")
    for flag in ("rois_per_image", "train_pre_nms", "train_proposals", "test_proposals"):
        if getattr(args, flag) < 1:
            name = "--" + flag.replace("_", "-")
            raise ReslabError(f"{name} must be >= 1, got {getattr(args, flag)}")
    check_positive_fraction("--roi-positive-fraction", args.roi_positive_fraction)
    if args.pretrain_minutes < 0:
        raise ReslabError(f"--pretrain-minutes must be >= 0, got {args.pretrain_minutes:g}")
    check_jitter(args.pretrain_jitter)
    check_ema(args.ema)
    if args.rescore_minutes < 0:
        raise ReslabError(f"--rescore-minutes must be >= 0, got {args.rescore_minutes:g}")
    for flag in ("pretrain_minutes", "rescore_minutes"):
        if getattr(args, flag) and args.resume:
            name = "--" + flag.replace("_", "-")
            raise ReslabError(f"{name} starts a run; --resume continues one: give one")
    before = args.pretrain_minutes + args.rescore_minutes
    if before and 0 < args.max_minutes <= before:
        raise ReslabError(
            f"--pretrain-minutes and --rescore-minutes ({before:g} together) must be less "
            f"than --max-minutes ({args.max_minutes:g}), whose budget they share"
        )


def _detector_config(args, dataset: CocoDetection) -> DetectorConfig:
    if args.resume:
        return DetectorConfig.from_dict(
            load_checkpoint(Path(args.out) / "last.pt")["model"]["kwargs"]
        )
    pretrained = args.backbone_weights is not None
    return DetectorConfig(
        backbone=args.backbone,
        width=args.width,
        num_classes=dataset.num_classes,
        frozen_bn=pretrained,
        freeze_at=2 if pretrained else 0,
        min_size=args.min_size or _native_min_size(dataset),
        max_size=args.max_size,
        **proposal_configs(args),
    )


def proposal_configs(args) -> dict:
    """``rpn`` and ``roi_heads`` for DetectorConfig from the anchor, proposal and RoI sampling
    flags that `detect train` and the detection benchmark share."""
    return {
        "rpn": RPNConfig(
            anchor_sizes=args.anchor_sizes,
            pre_nms_top_n_train=args.train_pre_nms,
            post_nms_top_n_train=args.train_proposals,
            post_nms_top_n_test=args.test_proposals,
        ),
        "roi_heads": RoIHeadsConfig(
            batch_size_per_image=args.rois_per_image,
            positive_fraction=args.roi_positive_fraction,
        ),
    }


def _build(args, detector: DetectorConfig, console: Console):
    """The detector, seeded, with --backbone-weights loaded when given for a new run."""
    torch.manual_seed(args.seed)
    model = build_detector(detector)
    if args.backbone_weights and not args.resume:
        path = Path(args.backbone_weights)
        if not path.is_file():
            raise ReslabError(f"backbone weights {path} do not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for a bad file
            raise ReslabError(
                f"cannot read {path} as a state dict ({type(error).__name__})"
            ) from None
        skipped = load_backbone_weights(model, state.get("state_dict", state))
        console.print(f"loaded {path} into trunk and head (unused: {', '.join(skipped)})")
    return model


def _pretrain(args) -> None:
    """--pretrain-minutes, in this process with all its threads, before any rank starts."""
    console = Console()
    dataset = _dataset(args, "train", None)
    model = _build(args, _detector_config(args, dataset), console)
    record = pretrain_box_classifier(
        model,
        dataset,
        args.pretrain_minutes,
        seed=args.seed,
        console=console,
        jitter=args.pretrain_jitter,
        bf16=args.bf16,
    )
    save_warm_start(model, args.out, record)


def _train_rescorer(args) -> None:
    """--rescore-minutes, in this process with all its threads, before any rank starts."""
    console = Console()
    rescorer, record = train_rescorer(
        _dataset(args, "train", None),
        args.rescore_minutes,
        seed=args.seed,
        bf16=args.bf16,
        console=console,
    )
    save_rescorer(rescorer, args.out, record)


def run_train(args) -> int:
    _check_train_args(args)
    processes = args.processes or cpu_cores()
    launcher = processes > 1 and not in_launched_world()
    if launcher:
        check_batch(World(size=processes), args.batch_size)
    _set_threads(args)
    if args.rescore_minutes and not in_launched_world():
        _train_rescorer(args)
    if args.pretrain_minutes and not in_launched_world():
        _pretrain(args)
    if launcher:
        return relaunch(processes, args.argv, args.threads or 0)
    world = init_world()
    console = Console() if world.is_main else Console(quiet=True)
    dataset = _dataset(args, "train", train_transforms())
    detector = _detector_config(args, dataset)
    if detector.num_classes != dataset.num_classes:
        raise ReslabError(
            f"the checkpoint has {detector.num_classes - 1} classes, the data "
            f"{dataset.num_classes - 1}"
        )
    model = _build(args, detector, console)
    max_minutes = args.max_minutes
    if args.pretrain_minutes:
        record = load_warm_start(model, args.out)
        if max_minutes:  # the pretraining, crops' making included, came out of the budget
            max_minutes -= record["seconds"] / 60
    rescorer = None
    if args.rescore_minutes:
        rescorer = load_rescorer_payload(args.out)
        if max_minutes:  # so did the rescorer's training
            max_minutes -= rescorer["record"]["seconds"] / 60
    config = DetectTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_iters=args.warmup_iters,
        bf16=args.bf16,
        ema=args.ema,
        seed=args.seed,
        max_minutes=max_minutes,
    )
    console.print(f"detector: {asdict(detector)}")
    console.print(
        f"training: {asdict(config)}; {len(dataset)} images, {dataset.num_classes - 1} classes"
    )
    if world.active:
        console.print(
            f"processes: {world.size}; global batch {config.batch_size} "
            f"({config.batch_size // world.size} per process)"
        )
    losses = train_detector(
        model,
        dataset,
        config,
        args.out,
        resume=args.resume,
        console=console,
        world=world,
        rescorer=rescorer,
    )
    console.print("last step: " + ", ".join(f"{k}={v:.4f}" for k, v in losses.items()))
    console.print(f"checkpoint: {Path(args.out) / 'last.pt'}")
    if args.data is not None and world.is_main:
        report_metrics(
            console,
            evaluate_detector(
                model,
                _dataset(args, "val", eval_transforms()),
                config.batch_size,
                config.bf16,
                rescorer=rescorer_from_checkpoint(load_checkpoint(Path(args.out) / "last.pt")),
            ),
            "val",
        )
    return 0


def report_metrics(console: Console, metrics: dict, title: str) -> None:
    table = Table(title=f"COCO box AP ({title}, {metrics['detections']} detections)")
    table.add_column("class")
    table.add_column("AP@[.5:.95]", justify="right")
    for name, ap in metrics["per_class"].items():
        table.add_row(name, f"{ap:.3f}")
    table.add_section()
    table.add_row("mAP@[.5:.95]", f"{metrics['mAP']:.3f}")
    table.add_row("mAP@.5", f"{metrics['mAP50']:.3f}")
    console.print(table)
    console.print(errors_line(metrics), soft_wrap=True)


def errors_line(metrics: dict, top: int = 3) -> str:
    """Finding against naming, from :func:`error_breakdown`'s keys, in one line."""
    pairs = sorted(
        (
            (count, truth, label)
            for truth, row in metrics["confusion"].items()
            for label, count in row.items()
        ),
        key=lambda pair: -pair[0],
    )
    line = (
        f"class-agnostic mAP@.5 {metrics['class_agnostic_mAP50']:.3f}: "
        f"{metrics['found']:,} of {metrics['objects']:,} objects found at IoU 0.5, "
        f"{metrics['label_accuracy']:.1%} of them with the right label"
    )
    if pairs:
        line += "; most confused: " + ", ".join(
            f"{truth} as {label} {count}" for count, truth, label in pairs[:top]
        )
    return line


def run_eval(args) -> int:
    _set_threads(args)
    _check_inference_args(args)
    payload = load_checkpoint(args.checkpoint)
    model = prepare_detector_for_inference(detector_from_checkpoint(payload))
    if args.score_thresh is not None:
        model.roi_heads.score_thresh = args.score_thresh
    _set_nms(model, args.nms)
    dataset = _dataset(args, args.split, eval_transforms())
    if args.int8:
        source = dataset
        if args.data is not None and args.split != "train":
            images, annotations = resolve(args.data, None, None, "train")
            if annotations.is_file():
                source = CocoDetection(images, annotations, eval_transforms())
        _quantize(model, _first_images(source, args.calibration_images), Console())
    rescorer = _rescorer(args, payload)
    if rescorer is not None:
        Console().print("scores rescored by the checkpoint's classifier (--no-rescore: not)")
    metrics = evaluate_detector(
        model, dataset, args.batch_size, args.bf16, args.flip, args.scales, args.refine, rescorer
    )
    report_metrics(Console(), metrics, args.split if args.data else str(args.annotations))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
    return 0


def run_predict(args) -> int:
    _set_threads(args)
    _check_inference_args(args)
    payload = load_checkpoint(args.checkpoint)
    model = prepare_detector_for_inference(detector_from_checkpoint(payload))
    model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, args.score_thresh)
    _set_nms(model, args.nms)
    if args.int8:
        images = [read_image(path) for path in args.image[: args.calibration_images]]
        _quantize(model, images, Console(stderr=True))
    records = predict_images(
        model,
        args.image,
        payload["class_names"],
        args.out,
        args.score_thresh,
        args.bf16,
        args.flip,
        args.scales,
        args.refine,
        _rescorer(args, payload),
    )
    path = Path(args.out) / "predictions.json"
    path.write_text(json.dumps(records, indent=1))
    for record in records:
        print(f"{record['image']}: {len(record['detections'])} objects -> {record['drawn']}")
    print(f"detections: {path}")
    return 0
