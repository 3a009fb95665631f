"""`reslab detect train|eval|predict`: the C4 Faster R-CNN on COCO-format data.

The flags become a :class:`~reslab.engine.detect_config.DetectConfig` or an
:class:`~reslab.engine.detect_config.InferConfig`; the engine checks and runs them.
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from reslab.cli.detect_train_flags import (
    TRAIN,
    add_planned_flags,
    add_recipe_flags,
    flag_type,
    planned_config,
)
from reslab.engine.detect_config import DetectConfig, InferConfig, scale_factors, validate_inference
from reslab.engine.detect_infer import evaluate_checkpoint, predict_files
from reslab.engine.detect_train import run_training
from reslab.precision import BF16_MIN_SPEEDUP, PRECISIONS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="Faster R-CNN with a ResNet C4 backbone",
        description="Train, evaluate and run a C4 Faster R-CNN (Ren et al. 2015; detectron2 "
        "Base-RCNN-C4 defaults) on COCO-format data.",
    )
    actions = parser.add_subparsers(metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train a detector",
        description="Train on the train split; checkpoints to OUT/last.pt.",
    )
    for add in (_data_flags, add_planned_flags, add_recipe_flags, _model_flags, _recipe_flags):
        add(train)
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser(
        "eval", help="COCO mAP of a checkpoint", description="COCO box AP (pycocotools COCOeval)."
    )
    evaluate.add_argument("checkpoint", help="a detector checkpoint or its run folder")
    _data_flags(evaluate)
    evaluate.add_argument("--split", default="val", help="with --data (default %(default)s)")
    evaluate.add_argument(
        "--batch-size", type=int, default=4, help="images per forward pass (default %(default)s)"
    )
    _inference_flags(
        evaluate, "the train split's first N images with --data, else the first N evaluated"
    )
    evaluate.add_argument(
        "--score-thresh",
        type=float,
        metavar="P",
        help="keep detections whose class probability is at least P (default: the "
        "checkpoint's, 0.05 as in detectron2; COCO evaluations often use 0.001)",
    )
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
    _inference_flags(predict, "the first N of the given images")
    _threads_flag(predict)
    predict.set_defaults(func=run_predict)


def _threads_flag(parser) -> None:
    parser.add_argument("--threads", type=int, help="CPU threads (per process with --processes)")


def _data_flags(parser) -> None:
    parser.add_argument("--data", help="a folder as `reslab scenes make` writes it")
    parser.add_argument("--images", help="image folder of a COCO dataset (with --annotations)")
    parser.add_argument("--annotations", help="COCO JSON annotation file (with --images)")
    _threads_flag(parser)


def _precision_flags(parser, what: str) -> argparse._MutuallyExclusiveGroup:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="fp32, bf16 (bfloat16 autocast: fast only where the CPU has native bf16, "
        f"AVX512-BF16 or AMX) or auto: where bf16 is native, {what} is timed in both and bf16 "
        f"kept if clearly faster ({BF16_MIN_SPEEDUP:g}x), the CPU's AMX deciding when timing "
        "cannot tell; fp32 otherwise (default %(default)s)",
    )
    group.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    return group


def _model_flags(parser) -> None:
    parser.add_argument("--out", default=TRAIN.out, help="run folder (default %(default)s)")
    parser.add_argument(
        "--backbone-weights",
        metavar="imagenet|FILE|RUN",
        help="pretrained trunk and head: torchvision's ImageNet weights (imagenet, "
        "IMAGENET1K_V1/V2; from the TORCH_HOME cache or downloaded), a state dict or "
        "safetensors file, or a reslab classification run; batch norm, the stem and layer1 "
        "are then frozen, as detectron2 does (default: none, from scratch)",
    )


def _recipe_flags(parser) -> None:
    recipe = TRAIN.train
    parser.add_argument(
        "--seed",
        type=int,
        default=recipe.seed,
        help="seed for the weights and the order of images (default %(default)s)",
    )
    _precision_flags(parser, "a training step")
    parser.add_argument(
        "--ema",
        type=float,
        default=recipe.ema,
        metavar="DECAY",
        help="keep a moving average of the weights and batch-norm statistics, this decay per "
        "step (such as 0.999), and save and evaluate it instead of the last weights "
        "(default 0: off)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=recipe.max_minutes,
        help="a wall-clock budget for the whole run: the rate anneals within it and the run "
        "stops with a checkpoint when it is spent; the plan fits its steps to it from a timed "
        "step (0: no limit)",
    )


def _inference_flags(parser, calibration: str) -> None:
    """The flags `detect eval` and `detect predict` share."""
    group = _precision_flags(parser, "one image through the detector")
    group.add_argument(
        "--int8",
        action="store_true",
        help="int8 res5 box head (post-training quantization; the trunk stays fp32): faster "
        "on CPUs with VNNI, at some cost in accuracy",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=16,
        metavar="N",
        help=f"with --int8: images whose RoIs fix the int8 scales: {calibration} "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--flip",
        action="store_true",
        help="average the box head over each image and its mirror image (test-time flip "
        "averaging); the trunk and head run twice",
    )
    parser.add_argument(
        "--scales",
        type=flag_type(scale_factors),
        default=(1.0,),
        metavar="F,F,...",
        help="also average the box head over the image resized by these factors, the RPN's "
        "proposals scaled with it (default 1: the image as the model resizes it); with --flip "
        "each scale and its mirror; the trunk and head run once per view",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="run the box head again at the boxes it moved each proposal to and average the "
        "two passes' class probabilities, the boxes taking the second pass's shifts",
    )
    parser.add_argument(
        "--no-rescore",
        action="store_true",
        help="leave the scores as the detector gives them when the checkpoint has a rescoring "
        "classifier (detect train --rescore-minutes); by default it rescores",
    )
    parser.add_argument(
        "--nms",
        type=float,
        metavar="IOU",
        help="drop a detection that overlaps a higher-scoring one of its class by more than "
        "this IoU (default: the checkpoint's, 0.5 as in detectron2)",
    )


def _precision(args) -> str:
    """``--precision``, or bf16 for the deprecated ``--bf16``, said once per run."""
    if not args.bf16:
        return args.precision
    if os.environ.get("RANK", "0") == "0":
        print("reslab: --bf16 is deprecated; use --precision bf16", file=sys.stderr)
    return "bf16"


def _pick(args, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names}


def train_config(args) -> DetectConfig:
    """`detect train`'s flags as the engine's config (checked when the run starts)."""
    return planned_config(args, _precision(args))


def inference_config(args) -> InferConfig:
    """`detect eval|predict`'s flags as the engine's config, checked."""
    shared = ("checkpoint", "int8", "calibration_images", "flip", "scales", "refine", "nms")
    values = {
        **_pick(args, shared),
        "score_thresh": args.score_thresh,
        "precision": _precision(args),
        "rescore": not args.no_rescore,
        "threads": args.threads or 0,
    }
    if hasattr(args, "image"):  # predict
        values.update(files=list(args.image), out=args.out)
    else:
        data = _pick(args, ("data", "images", "annotations"))
        values.update(data=data, split=args.split, batch_size=args.batch_size, json=args.json)
    return validate_inference(InferConfig.from_dict(values))


def run_train(args) -> int:
    return run_training(train_config(args), args.argv)


def run_eval(args) -> int:
    evaluate_checkpoint(inference_config(args), Console())
    return 0


def run_predict(args) -> int:
    predict_files(inference_config(args), Console(stderr=True))
    return 0
