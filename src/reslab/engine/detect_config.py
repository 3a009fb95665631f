"""The typed configurations of `reslab detect train|eval|predict` and the rules they must meet.

``DetectConfig`` is a training run: its data, the detector to build, the recipe
(``DetectTrainConfig``), the warm starts trained before it, and how many processes run it.
``InferConfig`` is an evaluation or a prediction. Both come from plain dicts (``from_dict``
refuses unknown keys) and are checked by ``validate`` before any data is read; every broken
rule is one ``ReslabError`` line that names the flag to change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import get_type_hints

from reslab.data.coco import CocoDetection, resolve
from reslab.errors import ReslabError, check_whole, finite_positive
from reslab.models.detection import (
    BACKBONES,
    DetectorConfig,
    RoIHeadsConfig,
    RPNConfig,
    check_positive_fraction,
)
from reslab.precision import PRECISIONS

# detectron2's test-time shorter side; smaller datasets (the 128-pixel scenes) keep their size
DEFAULT_MIN_SIZE = 800


@dataclass
class DetectTrainConfig:
    """The recipe of the detection training itself; checkpoints and config.json record it."""

    epochs: int = 12
    batch_size: int = 4
    lr: float = 0.02  # detectron2's 0.02 is for 16 images; scaled linearly by batch_size / 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 200  # linear warm-up from lr/1000 (Goyal et al. 2017; detectron2)
    clip_grad_norm: float = 10.0  # guards from-scratch runs against early blow-ups
    # bfloat16 autocast; a run sets it from DetectConfig.precision once that is resolved
    bf16: bool = False
    # decay per step of an exponential moving average of the weights and batch-norm statistics
    # (Polyak averaging); checkpoints and the trained model hold the average; 0: off
    ema: float = 0.0
    seed: int = 0
    # a wall-clock budget: the schedule anneals within it and the run stops (with a checkpoint)
    # when it is spent; 0: no limit. In a DetectConfig it is the whole run's; the warm starts'
    # minutes come out of it before the detection training starts
    max_minutes: float = 0.0

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 16


@dataclass
class DataPaths:
    """A folder as `reslab scenes make` writes it, or one COCO image folder and its JSON; for
    training, a val split beside it or held out of it."""

    data: str | None = None
    images: str | None = None
    annotations: str | None = None
    val_images: str | None = None  # with val_annotations: the val split of images+annotations
    val_annotations: str | None = None
    val_fraction: float = 0.0  # or this share of those images held out as the val split

    @property
    def has_val(self) -> bool:
        """Whether training has a val split to score at the end."""
        return self.data is not None or self.val_annotations is not None or self.val_fraction > 0

    def dataset(self, split: str, transforms=None) -> CocoDetection:
        if self.data is None and split == "val" and self.val_annotations is not None:
            return CocoDetection(self.val_images, self.val_annotations, transforms)
        images, annotations = resolve(self.data, self.images, self.annotations, split)
        dataset = CocoDetection(images, annotations, transforms)
        if self.data is not None or not self.val_fraction:
            return dataset
        held_out = dataset.held_out(self.val_fraction)
        if split == "val":
            return dataset.subset(held_out)
        return dataset.subset(set(dataset.image_ids) - held_out)


@dataclass
class DetectorSettings:
    """The detector to build; the data supplies the classes and, unless given, the image size."""

    backbone: str = "resnet101"
    width: float = 1.0  # channel multiplier
    # an ImageNet torchvision ResNet state dict; with it batch norm, the stem and layer1 are
    # frozen, as detectron2 does (FREEZE_AT=2)
    weights: str | None = None
    min_size: int | None = None  # None: the images' own shorter side, at most DEFAULT_MIN_SIZE
    max_size: int = 1333
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)

    def detector(self, dataset: CocoDetection) -> DetectorConfig:
        native = min(DEFAULT_MIN_SIZE, max(min(i["width"], i["height"]) for i in dataset.images))
        pretrained = self.weights is not None
        return DetectorConfig(
            backbone=self.backbone,
            width=self.width,
            num_classes=dataset.num_classes,
            frozen_bn=pretrained,
            freeze_at=2 if pretrained else 0,
            min_size=self.min_size or native,
            max_size=self.max_size,
            rpn=self.rpn,
            roi_heads=self.roi_heads,
        )


@dataclass
class WarmStarts:
    """What trains before the detector, in one process, within the run's budget."""

    # train trunk, res5 head and class layer as a classifier on crops around the training
    # boxes for this long (reslab.engine.box_pretrain); 0: none
    pretrain_minutes: float = 0.0
    pretrain_jitter: float = 0.0  # move each crop box's edges by up to this share of its size
    # train a classifier on windows around the training boxes for this long; eval and predict
    # multiply each score by its probability of the label (reslab.engine.rescore); 0: none
    rescore_minutes: float = 0.0

    @property
    def minutes(self) -> float:
        return self.pretrain_minutes + self.rescore_minutes


@dataclass
class PlanChoice:
    """Where the recipe comes from: ``planned`` from the data and the machine
    (:mod:`reslab.engine.detect_plan`) for every flag not in ``explicit``, or ``detectron2``,
    the paper defaults the fields hold."""

    recipe: str = "detectron2"
    explicit: tuple[str, ...] = ()  # flags of FLAG_FIELDS the user gave; a plan keeps them
    file: str | None = None  # a plan.json to apply instead of planning (the ranks get one)


RECIPES = ("planned", "detectron2")


@dataclass
class DetectConfig:
    """`reslab detect train`: printed when the run starts; the recipe lands in config.json."""

    data: DataPaths = field(default_factory=DataPaths)
    out: str = "runs/detect"
    resume: bool = False  # continue from out/last.pt
    model: DetectorSettings = field(default_factory=DetectorSettings)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)
    warm: WarmStarts = field(default_factory=WarmStarts)
    # fp32, bf16 or auto (resolved once, before the warm starts, by timing training steps)
    precision: str = "auto"
    processes: int = 1  # local DDP processes; 0: one per core
    threads: int = 0  # intra-op CPU threads per process; 0: torch's choice
    plan: PlanChoice = field(default_factory=PlanChoice)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DetectConfig:
        return _build(cls, values)


@dataclass
class InferConfig:
    """`reslab detect eval` (a dataset split) and `reslab detect predict` (image files)."""

    checkpoint: str = ""  # a detector checkpoint or its run folder
    data: DataPaths = field(default_factory=DataPaths)  # eval
    split: str = "val"  # eval, with data.data
    files: list[str] = field(default_factory=list)  # predict: PNG or JPEG files
    out: str = "predictions"  # predict: where the drawn images and predictions.json go
    json: str | None = None  # eval: also write the metrics here
    batch_size: int = 4  # images per forward pass
    precision: str = "auto"  # fp32, bf16 or auto (one image timed in each)
    int8: bool = False  # int8 res5 box head, calibrated on calibration_images images
    calibration_images: int = 16
    # test-time views (reslab.models.detection.detect_averaged)
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    refine: bool = False
    rescore: bool = True  # multiply scores by the checkpoint's rescoring classifier's, if any
    # keep detections whose class probability is at least this; eval: None keeps the
    # checkpoint's; predict draws at least this and lowers the model's to it when above
    score_thresh: float | None = None
    nms: float | None = None  # the box NMS IoU; None: the checkpoint's
    threads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> InferConfig:
        return _build(cls, values)


# Each flag a plan may set (reslab.engine.detect_plan) -> its field's path in a DetectConfig
FLAG_FIELDS = {
    "backbone": ("model", "backbone"),
    "width": ("model", "width"),
    "min_size": ("model", "min_size"),
    "max_size": ("model", "max_size"),
    "anchor_sizes": ("model", "rpn", "anchor_sizes"),
    "anchor_ratios": ("model", "rpn", "aspect_ratios"),
    "train_pre_nms": ("model", "rpn", "pre_nms_top_n_train"),
    "train_proposals": ("model", "rpn", "post_nms_top_n_train"),
    "test_proposals": ("model", "rpn", "post_nms_top_n_test"),
    "rois_per_image": ("model", "roi_heads", "batch_size_per_image"),
    "roi_positive_fraction": ("model", "roi_heads", "positive_fraction"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "warmup_iters": ("train", "warmup_iters"),
    "pretrain_minutes": ("warm", "pretrain_minutes"),
    "pretrain_jitter": ("warm", "pretrain_jitter"),
    "rescore_minutes": ("warm", "rescore_minutes"),
    "processes": ("processes",),
}


def flag_value(config: DetectConfig, flag: str):
    """The value ``config`` holds for a flag of :data:`FLAG_FIELDS`."""
    value = config
    for name in FLAG_FIELDS[flag]:
        value = getattr(value, name)
    return value


def set_flags(config: DetectConfig, values: dict) -> DetectConfig:
    """A copy of ``config`` with the flags of :data:`FLAG_FIELDS` in ``values`` set."""
    tree = config.to_dict()
    for flag, value in values.items():
        *parents, last = FLAG_FIELDS[flag]
        node = tree
        for name in parents:
            node = node[name]
        node[last] = list(value) if isinstance(value, tuple) else value
    return DetectConfig.from_dict(tree)


def proposal_settings(flags: dict) -> tuple[dict, dict]:
    """The RPN's and the RoI heads' settings from flag-named values (``anchor_sizes``,
    ``train_pre_nms``, ``train_proposals``, ``test_proposals``, ``rois_per_image``,
    ``roi_positive_fraction`` and, if there, ``anchor_ratios``), for
    :class:`DetectorSettings`."""
    settings: dict[str, dict] = {"rpn": {}, "roi_heads": {}}
    for flag, (_, part, name) in (
        (flag, path) for flag, path in FLAG_FIELDS.items() if path[:2] in PROPOSAL_PARTS
    ):
        if flag in flags:
            settings[part][name] = flags[flag]
    return settings["rpn"], settings["roi_heads"]


PROPOSAL_PARTS = (("model", "rpn"), ("model", "roi_heads"))


def _build(cls, values: dict):
    """``cls`` from a dict of its fields, nested dataclasses from nested dicts, lists where a
    tuple is declared as tuples (JSON has no tuples); unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ReslabError(f"unknown config key(s) {sorted(unknown)} for {cls.__name__}")
    types = get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kind = types[name]
        if is_dataclass(kind) and isinstance(value, dict):
            value = _build(kind, value)
        elif isinstance(value, list) and getattr(kind, "__origin__", None) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _numbers(text: str, most: float, what: str, example: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    check_numbers(values, most, what, example, text)
    return values


def check_numbers(
    values: tuple, most: float, what: str, example: str, given: str | None = None
) -> None:
    """Each of ``values`` above 0 and at most ``most``, and at least one."""
    if not values or not all(
        isinstance(v, int | float) and math.isfinite(v) and 0 < v <= most for v in values
    ):
        given = given if given is not None else ",".join(map(str, values))
        raise ReslabError(
            f"{given!r} is not a list of {what}; give numbers above 0 and at most {most:g}, "
            f"comma-separated, such as {example}"
        )


def scale_factors(text: str) -> tuple[float, ...]:
    """``--scales``: resize factors in (0, 4], comma-separated."""
    return _numbers(text, 4, "resize factors", "1,1.25")


def iou_list(text: str) -> tuple[float, ...]:
    """A list of IoU thresholds in (0, 1], comma-separated."""
    return _numbers(text, 1, "IoU thresholds", "0.4,0.5")


def anchor_ratios(text: str) -> tuple[float, ...]:
    """``--anchor-ratios``: anchor heights over widths in (0, 16], comma-separated."""
    return _numbers(text, 16, "anchor height:width ratios", "0.5,1,2")


def anchor_sizes(text: str) -> tuple[int, ...]:
    """``--anchor-sizes``: positive pixel sides, comma-separated, ascending."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    check_anchor_sizes(sizes, text)
    return sizes


def check_anchor_sizes(sizes: tuple, given: str | None = None) -> None:
    ok = sizes and all(isinstance(s, int) and s > 0 for s in sizes)
    if not ok or list(sizes) != sorted(set(sizes)):
        given = given if given is not None else ",".join(map(str, sizes))
        raise ReslabError(
            f"{given!r} is not a list of anchor sides; give positive whole pixels in "
            "ascending order, comma-separated, such as 16,32,64,128"
        )


def check_ema(decay: float) -> None:
    if not 0 <= decay < 1:
        raise ReslabError(f"--ema must be at least 0 and below 1 (such as 0.999), got {decay:g}")


def check_probability(flag: str, value: float) -> None:
    """A class-probability threshold, from 0 to 1."""
    if not 0 <= value <= 1:
        raise ReslabError(f"--{flag} is a class probability, from 0 to 1; got {value:g}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ReslabError(f"--precision must be one of {PRECISIONS}, got {precision!r}")


def _check_model(model: DetectorSettings) -> None:
    if model.backbone not in BACKBONES:
        raise ReslabError(f"--backbone must be one of {BACKBONES}, got {model.backbone!r}")
    finite_positive("width", model.width)
    check_whole("max-size", model.max_size)
    if model.min_size is not None:
        check_whole("min-size", model.min_size)
    rpn, roi = model.rpn, model.roi_heads
    check_anchor_sizes(tuple(rpn.anchor_sizes))
    check_numbers(tuple(rpn.aspect_ratios), 16, "anchor height:width ratios", "0.5,1,2")
    for flag, value in (
        ("rois-per-image", roi.batch_size_per_image),
        ("train-pre-nms", rpn.pre_nms_top_n_train),
        ("train-proposals", rpn.post_nms_top_n_train),
        ("test-proposals", rpn.post_nms_top_n_test),
    ):
        if value < 1:
            raise ReslabError(f"--{flag} must be >= 1, got {value}")
    check_positive_fraction("--roi-positive-fraction", roi.positive_fraction)


def _check_recipe(train: DetectTrainConfig) -> None:
    for flag, value, least in (
        ("epochs", train.epochs, 1),
        ("batch-size", train.batch_size, 1),
        ("warmup-iters", train.warmup_iters, 0),
    ):
        check_whole(flag, value, least)
    finite_positive("lr", train.lr)
    finite_positive("max-minutes", train.max_minutes, allow_zero=True)
    check_ema(train.ema)


def _check_warm_starts(warm: WarmStarts, resume: bool, max_minutes: float) -> None:
    from reslab.engine.box_pretrain import check_jitter  # box_pretrain imports the detector's

    if warm.pretrain_minutes < 0:
        raise ReslabError(f"--pretrain-minutes must be >= 0, got {warm.pretrain_minutes:g}")
    check_jitter(warm.pretrain_jitter)
    if warm.rescore_minutes < 0:
        raise ReslabError(f"--rescore-minutes must be >= 0, got {warm.rescore_minutes:g}")
    for flag, minutes in (
        ("pretrain-minutes", warm.pretrain_minutes),
        ("rescore-minutes", warm.rescore_minutes),
    ):
        if minutes and resume:
            raise ReslabError(f"--{flag} starts a run; --resume continues one: give one")
    if warm.minutes and 0 < max_minutes <= warm.minutes:
        raise ReslabError(
            f"--pretrain-minutes and --rescore-minutes ({warm.minutes:g} together) must be less "
            f"than --max-minutes ({max_minutes:g}), whose budget they share"
        )


def _check_data(data: DataPaths, plan: PlanChoice) -> None:
    if (data.val_images is None) != (data.val_annotations is None):
        raise ReslabError("--val-images and --val-annotations go together: give both or neither")
    if not 0 <= data.val_fraction < 1:
        raise ReslabError(
            f"--val-fraction is a share below 1, such as 0.1; got {data.val_fraction:g}"
        )
    held = data.val_fraction > 0
    if held and (data.data is not None or data.val_annotations is not None):
        raise ReslabError(
            "--val-fraction holds a val split out of --images/--annotations; --data and "
            "--val-annotations bring their own: give one"
        )
    if data.data is not None and data.val_annotations is not None:
        raise ReslabError(
            "--data has its own val split; --val-images/--val-annotations go with --images"
        )
    if plan.recipe not in RECIPES:
        raise ReslabError(f"--recipe must be one of {RECIPES}, got {plan.recipe!r}")
    unknown = set(plan.explicit) - set(FLAG_FIELDS)
    if unknown:
        raise ReslabError(
            f"unknown planned flag(s) {sorted(unknown)}; known: {sorted(FLAG_FIELDS)}"
        )


def validate(config: DetectConfig) -> DetectConfig:
    """One-line errors for values that cannot work, before any data is read."""
    _check_data(config.data, config.plan)
    _check_recipe(config.train)
    _check_model(config.model)
    if config.processes < 0:
        raise ReslabError(f"--processes must be >= 0, got {config.processes}")
    check_whole("threads", config.threads, least=0)
    _check_warm_starts(config.warm, config.resume, config.train.max_minutes)
    check_precision(config.precision)
    return config


def validate_inference(config: InferConfig) -> InferConfig:
    """The rules `detect eval` and `detect predict` share, before the checkpoint is read."""
    check_whole("calibration-images", config.calibration_images)
    check_whole("batch-size", config.batch_size)
    check_whole("threads", config.threads, least=0)
    if config.score_thresh is not None:
        check_probability("score-thresh", config.score_thresh)
    if config.nms is not None and not 0 < config.nms <= 1:
        raise ReslabError(f"--nms is an IoU above 0 and at most 1; got {config.nms:g}")
    check_numbers(tuple(config.scales), 4, "resize factors", "1,1.25")
    check_precision(config.precision)
    if config.int8 and config.precision == "bf16":
        raise ReslabError("--int8 runs the trunk in fp32: give --int8 or --precision bf16")
    return config
