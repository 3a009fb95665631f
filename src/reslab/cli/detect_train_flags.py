"""`reslab detect train`'s flags and the DetectConfig they make.

Every flag a plan may set (:data:`~reslab.engine.detect_config.FLAG_FIELDS`) defaults to None
here, so that the flags the user gave are known: they go to the engine as
``plan.explicit`` and the plan keeps them; the others take the plan's values, or
detectron2's with ``--recipe detectron2``.
"""

from __future__ import annotations

import argparse

from reslab.engine.detect_config import (
    FLAG_FIELDS,
    RECIPES,
    DetectConfig,
    anchor_ratios,
    anchor_sizes,
    flag_value,
    proposal_settings,
)
from reslab.errors import ReslabError
from reslab.models.detection import BACKBONES

TRAIN = DetectConfig()
# the paper defaults each planned flag takes with --recipe detectron2
DETECTRON2 = {flag: flag_value(TRAIN, flag) for flag in FLAG_FIELDS}


def flag_type(parse):
    """An engine parser as an argparse type: its one-line error becomes argparse's."""

    def convert(text: str):
        try:
            return parse(text)
        except ReslabError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__
    return convert


def _shown(flag: str) -> str:
    value = DETECTRON2[flag]
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "the images' own shorter side, at most 800" if value is None else f"{value}"


# flag -> (type, metavar, what it does); the default is the plan's, or detectron2's
PLANNED_FLAGS = {
    "backbone": (str, None, "ResNet depth for the C4 trunk and head"),
    "width": (float, "W", "channel multiplier"),
    "min_size": (int, "N", "shorter image side after resizing"),
    "max_size": (int, "N", "longer image side after resizing, at most"),
    "anchor_sizes": (
        flag_type(anchor_sizes),
        "PX,PX,...",
        "RPN anchor sides in pixels of the resized image, all on the one stride-16 map; "
        "planned: k-means clusters of the boxes' sides",
    ),
    "anchor_ratios": (
        flag_type(anchor_ratios),
        "R,R,...",
        "RPN anchor height:width ratios; planned: clusters of the boxes' ratios",
    ),
    "rois_per_image": (
        int,
        "N",
        "RoIs sampled per training image; res5 runs on each, so this sets a step's cost",
    ),
    "roi_positive_fraction": (float, "F", "largest share of the sampled RoIs that is positive"),
    "train_pre_nms": (int, "N", "RPN boxes, by objectness, entering NMS per training image"),
    "train_proposals": (int, "N", "proposals kept after NMS per training image"),
    "test_proposals": (int, "N", "proposals per image at test time"),
    "epochs": (int, "N", "passes over the training images; with --max-minutes, at most"),
    "batch_size": (int, "N", "images per optimizer step, over all --processes"),
    "lr": (float, "LR", "learning rate for 16 images, scaled by batch size"),
    "warmup_iters": (int, "N", "steps of linear rise to --lr at the start"),
    "pretrain_minutes": (
        float,
        "M",
        "first train trunk, res5 head and class layer as a classifier on crops around the "
        "training boxes for M minutes, part of --max-minutes",
    ),
    "pretrain_jitter": (
        float,
        "F",
        "with --pretrain-minutes: move each crop box's edges at random by up to F of its "
        "width or height every time it is drawn, like proposals near the object",
    ),
    "rescore_minutes": (
        float,
        "M",
        "first train a small classifier on windows around the training boxes for M minutes, "
        "part of --max-minutes; eval and predict multiply each detection's score by its "
        "probability of the detection's label (decoupled classification refinement)",
    ),
    "processes": (
        int,
        "N",
        "train in N local processes with DistributedDataParallel (0: one per core), each with "
        "its share of the cores; --batch-size stays the global batch",
    ),
}


def add_planned_flags(parser) -> None:
    """The flags of :data:`PLANNED_FLAGS`, each defaulting to None (not given)."""
    for flag, (kind, metavar, help) in PLANNED_FLAGS.items():
        parser.add_argument(
            "--" + flag.replace("_", "-"),
            type=kind,
            metavar=metavar,
            choices=BACKBONES if flag == "backbone" else None,
            help=f"{help} (default: planned; {_shown(flag)} with --recipe detectron2)",
        )


def add_recipe_flags(parser) -> None:
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="planned",
        help="planned: every flag above that is not given is planned from the training set's "
        "image and box sizes, objects per image, the cores and --max-minutes (printed, and "
        "kept in OUT/plan.json and the checkpoint); detectron2: the paper defaults, made for "
        "800-pixel COCO images on GPUs (default %(default)s)",
    )
    parser.add_argument(
        "--plan", metavar="FILE", help="apply a run's plan.json instead of planning"
    )
    parser.add_argument(
        "--val-images", metavar="DIR", help="with --val-annotations: a val split scored at the end"
    )
    parser.add_argument("--val-annotations", metavar="FILE", help="COCO JSON of --val-images")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this share of --images as a val split, scored at the end (default 0)",
    )


def planned_config(args, precision: str) -> DetectConfig:
    """`detect train`'s flags as the engine's config (checked when the run starts)."""
    explicit = [flag for flag in FLAG_FIELDS if getattr(args, flag) is not None]
    flags = {
        flag: DETECTRON2[flag] if getattr(args, flag) is None else getattr(args, flag)
        for flag in FLAG_FIELDS
    }
    rpn, roi_heads = proposal_settings(flags)
    model = {name: flags[name] for name in ("backbone", "width", "min_size", "max_size")}
    model.update(weights=args.backbone_weights, rpn=rpn, roi_heads=roi_heads)
    recipe = {name: flags[name] for name in ("epochs", "batch_size", "lr", "warmup_iters")}
    recipe.update(ema=args.ema, seed=args.seed, max_minutes=args.max_minutes)
    warm = {
        name: flags[name] for name in ("pretrain_minutes", "pretrain_jitter", "rescore_minutes")
    }
    data = ("data", "images", "annotations", "val_images", "val_annotations", "val_fraction")
    return DetectConfig.from_dict(
        {
            "data": {name: getattr(args, name) for name in data},
            "out": args.out,
            "resume": args.resume,
            "model": model,
            "train": recipe,
            "warm": warm,
            "precision": precision,
            "processes": flags["processes"],
            "threads": args.threads or 0,
            "plan": {"recipe": args.recipe, "explicit": explicit, "file": args.plan},
        }
    )
