"""The one typed configuration behind `reslab train`, its presets, its rules and its checks.

A run is ``TrainConfig`` = a preset's values, then the values the user gave
(:func:`config_from_flags`). It is printed at the start and saved as ``config.json`` in the run
folder, and every checkpoint carries it.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from reslab.errors import ReslabError, check_whole, finite_positive
from reslab.models import BLOCKS, list_models, model_defaults
from reslab.models.resnet import check_se
from reslab.precision import PRECISIONS
from reslab.weights import read_weights

OPTIMIZERS = ("sgd", "adamw", "adam")
CROPS = ("pad", "resized")
SCHEDULES = ("onecycle", "cosine", "step", "none")
# the flags that are constructor arguments of the model: they go to model_kwargs
MODEL_KEYS = ("stem", "width", "widths", "shortcut", "se", "zero_init_residual")
# what a resumed run may change; everything else is the saved run's
RESUMABLE = ("epochs", "device")


@dataclass
class TrainConfig:
    preset: str = "default"
    # model: a registry name plus constructor overrides (stem, width, ...); in_channels and
    # num_classes come from the data
    model: str = "resnet18"
    model_kwargs: dict = field(default_factory=dict)
    # pretrained weights to start from (reslab.weights): imagenet, IMAGENET1K_V1/V2, a
    # .pth/.pt/.safetensors file, or a reslab checkpoint or run folder; None = random
    weights: str | None = None
    # data: None = Fashion-MNIST (system dir, then data_dir, then download); else an
    # ImageFolder tree with train/ and val/, or one tree split by val_fraction
    data: str | None = None
    data_dir: str | None = None
    # the values a folder run chooses from the folder's size (batch_size, lr, epochs), those
    # not given, when no preset was named (reslab.engine.plan.plan_for_data); chosen before
    # the run starts, so config.json holds the values used
    plan_data: list = field(default_factory=list)
    val_fraction: float = 0.1
    image_size: int | None = None  # None: 28 for Fashion-MNIST, 64 for folders
    # folders: evaluation images have their shorter side resized to this and a centre crop of
    # image_size taken, as torchvision's ImageNet transforms do; 0 = the whole image squashed
    resize: int = 0
    normalize: bool = True  # subtract the training set's mean, divide by its std
    verify: bool = True  # check Fashion-MNIST files against the release's SHA-256
    workers: int = 2  # DataLoader workers decoding image-folder files
    strict: bool = False  # stop on an unreadable image-folder file instead of skipping it
    # optimisation
    epochs: int = 10
    # wall-time budget in minutes (0 = none): before training, a few steps and one evaluation
    # batch are timed and the run trains min(epochs, what fits) epochs, its schedule made for
    # that many, so a recipe keeps to its time on a slower or faster machine
    max_minutes: float = 0.0
    # where the budget last planned the epochs again (reslab.engine.plan.Replan): the step and
    # the share of the schedule's last cycle done then; the schedule spreads the rest of the
    # cycle over the steps left from there. Empty until a re-plan.
    schedule_anchor: list[float] = field(default_factory=list)
    # a test accuracy in percent (0 = none): the first epoch at or above it is marked in
    # metrics.jsonl ("target_reached") and its epoch, step and wall time are printed
    target: float = 0.0
    batch_size: int = 256
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "onecycle"
    warmup: float = 0.2  # fraction of steps that onecycle spends rising to lr
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # fine-tuning, after fastai's fine_tune (Howard & Gugger 2020): the first freeze_epochs
    # train the head alone, the body frozen with its batch norms in eval mode (train_bn: they
    # keep training, as fastai does; Keras and timm freeze them), on a one-cycle of their own
    # peaking at freeze_lr (0: 2 x lr); then the whole network trains on a second one-cycle,
    # each part's peak a step of a geometric slice from lr / lr_spread (the stem) to lr (the
    # head): discriminative rates (Howard & Ruder 2018, ULMFiT); lr_spread 1 = one rate
    freeze_epochs: int = 0
    freeze_lr: float = 0.0
    train_bn: bool = False
    lr_spread: float = 1.0
    # the frozen epochs train the head on the body's features of the un-augmented training
    # images, computed once: one forward pass over the data instead of one per epoch
    cache_features: bool = False
    # batch augmentation: random crop with crop_padding zero pixels, horizontal flip, random
    # erasing with probability erasing
    augment: bool = True
    # pad: the padded random crop; resized: a random crop of 8-100% of the image's area and
    # aspect ratio 3/4-4/3 resized to image_size (Szegedy et al. 2015), for photos
    crop: str = "pad"
    crop_padding: int = 2
    erasing: float = 0.25
    # the last clean_epochs epochs train on whole images (flip only: no crop, erasing or
    # CutMix), so the weights end on the distribution the test set has; 0 = off
    clean_epochs: int = 0
    # CutMix (Yun et al. 2019): the share of batches whose images get a box pasted from a
    # shuffled copy of the batch, the loss mixing the two labels by area; 0 = off
    cutmix: float = 0.0
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 = off
    # sharpness-aware minimisation (Foret et al. 2021): each step takes its gradient at the
    # weights moved sam (the radius rho) along the batch's normalised gradient, a second
    # forward and backward pass; on only after sam_start of the schedule's last cycle (Zhou
    # et al. 2024 found SAM late in training finds most of its flatter minima); 0 = off
    sam: float = 0.0
    sam_start: float = 0.75
    tta: bool = True  # average the logits of each test image and its mirror image
    # the last epoch's evaluation also averages over the image moved this many pixels right,
    # left, down and up (5 or, with tta, 10 views); 0 = off. Earlier epochs skip these views,
    # which cost as much as 4 evaluations; eval and predict use them too
    tta_shift: int = 0
    # speed
    # cpu, or cuda / cuda:N for an NVIDIA GPU. On a GPU fp32 means fp32: TF32 is switched off,
    # so a run there follows the CPU run's numerics and augmentation draws
    device: str = "cpu"
    # fp32, bf16 (bfloat16 autocast) or auto, resolved before the run starts by
    # reslab.precision's one rule, so config.json says which
    precision: str = "fp32"
    channels_last: bool = True
    eval_batch_size: int = 1000
    threads: int = 0  # intra-op CPU threads per process; 0 = the cores shared out evenly
    # local training processes (DistributedDataParallel over gloo, each with its share of the
    # cores); 0 = one per core. For machines whose cores one process cannot keep busy.
    processes: int = 1
    save_every: int = 0  # also write last.pt every N optimizer steps; 0 = at epoch ends only
    sync_bn: bool = False  # under torchrun: batch-norm statistics over all processes
    # bookkeeping
    seed: int = 0
    out: str | None = None  # run folder; default runs/<date>-<model>[-N]
    force: bool = False  # allow writing into an existing --out folder
    resume: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ReslabError(f"unknown config key(s) {sorted(unknown)}")
        return cls(**values)


# Each preset's runs, with their machines and times, are in docs/results.md.
PRESETS: dict[str, dict] = {
    # The tutorial recipe, kept as the reference point: ResNet-18 with its ImageNet stem,
    # 96x96 images in [0, 1] without augmentation, Adam at 1e-3, 5 epochs at a constant rate.
    # 89.49% (benchmarks/results/fashion_mnist-20261125-173554.json).
    "seed": dict(
        model="resnet18",
        model_kwargs={"stem": "imagenet"},
        image_size=96,
        normalize=False,
        epochs=5,
        batch_size=256,
        lr=1e-3,
        optimizer="adam",
        schedule="none",
        weight_decay=0.0,
        label_smoothing=0.0,
        augment=False,
        tta=False,
        precision="fp32",
        channels_last=False,
    ),
    # For a small CPU: ResNet-18 at 1/4 width, "small" stem (stage 1 at 14x14), one-cycle
    # Nesterov SGD, label smoothing, crop and flip, mirror test-time augmentation; as many of 40
    # epochs as fit in 9.5 minutes, so that `reslab train` keeps to 10 minutes anywhere and
    # uses them (20 epochs took 7.4 min: fashion_mnist-20261128-045334-12041.json).
    # 93.90% in 9.0 min (benchmarks/results/fashion_mnist-20261206-035456-16705.json).
    "default": dict(
        model="resnet18",
        model_kwargs={"stem": "small", "width": 0.25},
        epochs=40,
        max_minutes=9.5,
        batch_size=256,
        lr=0.2,
        erasing=0.0,
        precision="auto",
    ),
    # The highest accuracy within an hour on a small CPU: ResNet-18 at 1/4 width with the
    # "cifar" stem (stage 1 at 28x28), an EMA of the weights, 48 epochs or as many as fit in
    # 57 minutes, the last evaluation over 10 views (mirror and one-pixel moves).
    # 95.55% in 43.1 min (benchmarks/results/fashion_mnist-20261129-092512-13094.json).
    "best": dict(
        model="resnet18",
        model_kwargs={"stem": "cifar", "width": 0.25},
        epochs=48,
        max_minutes=57.0,
        batch_size=256,
        lr=0.2,
        ema=0.998,
        erasing=0.0,
        tta_shift=1,
        precision="auto",
    ),
    # Fine-tuning pretrained weights on a folder of images, with fastai's fine_tune defaults
    # (freeze_epochs 1, base_lr 2e-3, then base_lr / 2 over the slice (lr / 100, lr)), AdamW,
    # and the full-width network with its ImageNet stem that pretrained weights expect.
    "finetune": dict(
        model="resnet50",
        epochs=4,
        freeze_epochs=1,
        freeze_lr=2e-3,
        lr=1e-3,
        lr_spread=100.0,
        optimizer="adamw",
        weight_decay=0.01,
        warmup=0.3,
        batch_size=32,
        eval_batch_size=64,
        erasing=0.0,
        precision="auto",
    ),
}

# Time to 94% within 5 minutes: the default's recipe at batch 128, for twice the steps an
# epoch, as many of 16 epochs as fit in 4.6 minutes (the process start and the last evaluation
# take the rest), the last evaluation over 10 views, and the time at which 94% is first reached
# recorded. Short of it: 92.90% over five seeds
# (benchmarks/results/fashion_mnist-20261206-042939-17559.json).
PRESETS["speedrun"] = dict(
    PRESETS["default"], epochs=16, max_minutes=4.6, batch_size=128, lr=0.1, tta_shift=1, target=94.0
)

PLANNED = ("batch_size", "lr", "epochs")  # what plan_data may name


def build_config(preset: str = "default", **overrides) -> TrainConfig:
    """A preset's config with ``overrides`` (only the values the user actually gave)."""
    if preset not in PRESETS:
        raise ReslabError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    values = PRESETS[preset]
    if overrides.get("weights"):
        values = with_weights(values, overrides)
    config = replace(TrainConfig(preset=preset, **values), **overrides)
    validate(config)
    return config


def with_weights(values: dict, overrides: dict) -> dict:
    """A preset's values for a run that starts from pretrained weights: the architecture and
    the preprocessing the weights record (input size, resize and centre crop, and for photos
    the random resized crop), under the values the user gave. The preset's own model
    arguments (stem, width) are dropped: the weights fix the network."""
    values = dict(values)
    _, info = read_weights(overrides["weights"], overrides.get("model", values["model"]), False)
    if "model" not in overrides and info.model is not None:
        values["model"] = info.model["name"]
    recorded = info.model["kwargs"] if info.model and info.model["name"] == values["model"] else {}
    values["model_kwargs"] = {
        k: v for k, v in recorded.items() if k not in ("num_classes", "in_channels")
    }
    values["image_size"], values["resize"] = info.size, info.resize
    if info.resize and "image_size" in overrides:
        # the same share of the image in the centre crop at another size
        values["resize"] = round(overrides["image_size"] * info.resize / info.size)
    if info.resize:
        values["crop"] = "resized"
    return values


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``; a GPU must be visible to PyTorch."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ReslabError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    kind, _, index = device.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ReslabError(
            f"--device {device}: this PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}); train with --device cpu"
        )
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ReslabError(
            f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )


def validate(config: TrainConfig) -> None:
    """One-line errors for values that cannot work, before any data is read."""
    _check_types(config)
    _check_names_and_counts(config)
    _check_model(config)
    _check_rates(config)
    _check_run(config)


# the model's constructor arguments a config may hold (MODEL_KEYS), by type
MODEL_KEY_TYPES = {
    "stem": str,
    "width": float,
    "widths": list[int],
    "shortcut": str,
    "se": int,
    "zero_init_residual": bool,
}


def _fits(value, hint) -> bool:
    """Whether ``value`` (read from JSON or flags) is of the type ``hint`` of a config field:
    a bool is no number, an int is a float, a list's items are checked."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint in (bool, type(None)):
        return type(value) is hint
    if hint in (int, float):
        number = int if hint is int else int | float
        return isinstance(value, number) and not isinstance(value, bool)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    return isinstance(value, hint)


def _check_types(config: TrainConfig) -> None:
    """Each value of the type its field (or model argument) declares, before any rule reads
    it: a config file or a checkpoint's config can hold anything JSON can."""
    hints = typing.get_type_hints(TrainConfig)
    wrong = [
        (f"--{f.name.replace('_', '-')}", hints[f.name], getattr(config, f.name))
        for f in fields(TrainConfig)
        if not _fits(getattr(config, f.name), hints[f.name])
    ]
    if isinstance(config.model_kwargs, dict):
        for key, value in config.model_kwargs.items():
            hint = MODEL_KEY_TYPES.get(key)
            if hint is not None and not _fits(value, hint):
                wrong.append((f"--{key.replace('_', '-')}", hint, value))
    if wrong:
        flag, hint, value = wrong[0]
        kind = getattr(hint, "__name__", None) or str(hint).replace("NoneType", "None")
        raise ReslabError(f"{flag} must be {kind}, got {value!r:.60}")


def _check_names_and_counts(config: TrainConfig) -> None:
    if config.model not in list_models():
        model_defaults(config.model)  # raises, naming the close matches
    for name, allowed in (
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("precision", PRECISIONS),
        ("crop", CROPS),
    ):
        if getattr(config, name) not in allowed:
            raise ReslabError(f"--{name} must be one of {allowed}, got {getattr(config, name)!r}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        check_whole(name.replace("_", "-"), getattr(config, name))
    check_whole("crop-padding", config.crop_padding, least=0)
    check_whole("clean-epochs", config.clean_epochs, least=0)
    check_whole("tta-shift", config.tta_shift, least=0)
    finite_positive("lr", config.lr)


def _check_model(config: TrainConfig) -> None:
    if "width" in config.model_kwargs:
        finite_positive("width", config.model_kwargs["width"])
    if "widths" in config.model_kwargs:
        stages = len(model_defaults(config.model)["layers"])
        widths = config.model_kwargs["widths"]
        if len(widths) != stages:
            raise ReslabError(
                f"--widths gives {len(widths)} stage widths ({','.join(map(str, widths))}) but "
                f"{config.model} has {stages} stages; give {stages}"
            )
    check_se(config.model_kwargs.get("se", 0))
    residual = BLOCKS[model_defaults(config.model)["block"]].residual
    if config.model_kwargs.get("zero_init_residual") and not residual:
        raise ReslabError(
            f"--zero-init-residual needs residual blocks; {config.model} has none, and its "
            "blocks would start at zero and never train"
        )


def _check_rates(config: TrainConfig) -> None:
    finite_positive("max-minutes", config.max_minutes, allow_zero=True)
    finite_positive("target", config.target, allow_zero=True)
    if config.target > 100:
        raise ReslabError(f"--target is a test accuracy in percent, 0 to 100, got {config.target}")
    finite_positive("weight-decay", config.weight_decay, allow_zero=True)
    finite_positive("momentum", config.momentum, allow_zero=True)
    for name in ("label_smoothing", "erasing", "warmup", "ema"):
        value = getattr(config, name)
        finite_positive(name.replace("_", "-"), value, allow_zero=True)
        if value >= 1:
            raise ReslabError(f"--{name.replace('_', '-')} must be below 1, got {value}")
    finite_positive("sam", config.sam, allow_zero=True)
    if not 0 <= config.sam_start < 1:
        raise ReslabError(
            f"--sam-start must be a share of the steps in [0, 1), got {config.sam_start}"
        )
    if config.cutmix != 0 and not 0 < config.cutmix <= 1:
        raise ReslabError(f"--cutmix must be between 0 and 1, got {config.cutmix}")
    anchor = config.schedule_anchor
    if anchor and not (len(anchor) == 2 and anchor[0] >= 0 and 0 <= anchor[1] <= 1):
        raise ReslabError(
            f"schedule_anchor is [] or [step, share of the schedule done, 0 to 1]; got {anchor}"
        )
    _check_fine_tuning(config)


def _check_fine_tuning(config: TrainConfig) -> None:
    check_whole("freeze-epochs", config.freeze_epochs, least=0)
    finite_positive("freeze-lr", config.freeze_lr, allow_zero=True)
    finite_positive("lr-spread", config.lr_spread)
    if config.lr_spread < 1:
        raise ReslabError(
            f"--lr-spread is the head's rate over the stem's, at least 1 (1 = one rate for "
            f"all), got {config.lr_spread}"
        )
    if config.freeze_epochs and config.processes != 1:
        raise ReslabError(
            f"--freeze-epochs trains in one process; pass --processes 1 (got {config.processes})"
        )
    if config.cache_features and not config.freeze_epochs:
        raise ReslabError(
            "--cache-features caches the frozen body's features; add --freeze-epochs N"
        )
    if config.cache_features and (config.train_bn or config.sam):
        flag = "--train-bn" if config.train_bn else "--sam"
        raise ReslabError(
            f"--cache-features needs a body that does not change in the frozen epochs; "
            f"drop {flag} or --cache-features"
        )
    unknown = set(config.plan_data) - set(PLANNED)
    if unknown:
        raise ReslabError(f"plan_data may name {PLANNED}, got {sorted(unknown)}")


def _check_run(config: TrainConfig) -> None:
    check_device(config.device)
    if config.device != "cpu" and config.processes != 1:
        raise ReslabError(
            f"--device {config.device} trains in one process; pass --processes 1 "
            f"(got {config.processes})"
        )
    if not 0 < config.val_fraction < 1:
        raise ReslabError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")
    if config.image_size is not None and config.image_size < 8:
        raise ReslabError(f"--image-size must be at least 8, got {config.image_size}")
    check_whole("resize", config.resize, least=0)
    if config.resize and config.resize < (config.image_size or 0):
        raise ReslabError(
            f"--resize {config.resize} is smaller than --image-size {config.image_size}, the "
            "centre crop taken from it; give at least that, or 0 to squash whole images"
        )
    if min(config.crop_padding, config.workers, config.threads, config.processes) < 0:
        raise ReslabError("--crop-padding, --workers, --threads and --processes must be >= 0")
    if not isinstance(config.save_every, int) or config.save_every < 0:
        raise ReslabError(f"--save-every must be a whole number >= 0, got {config.save_every}")


def config_from_flags(
    preset: str | None, given: dict
) -> tuple[TrainConfig, dict | None, Path | None]:
    """(config, checkpoint payload or None, run folder or None) for `reslab train`.

    ``given`` holds only the values the user gave, by config field name (the model's
    constructor arguments, ``MODEL_KEYS``, among them). With ``resume`` the saved run's config
    is used and only ``RESUMABLE`` values may change. An epoch count given without
    ``max_minutes`` is exact: the preset's time budget is dropped. ``preset`` None is the
    default preset, and a folder run then chooses the batch size, rate and epochs not given
    from the folder's size (``plan_data``); with ``weights`` it is the finetune preset.
    """
    if "resume" in given:
        ignored = sorted(set(given) - {"resume", *RESUMABLE})
        if ignored:
            flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise ReslabError(
                f"--resume continues with the run's saved config; only --epochs and --device "
                f"may change (got {flags})"
            )
        from reslab.engine.train import resume_config  # engine.train imports this module

        return resume_config(given["resume"], given.get("epochs"), given.get("device"))
    given = dict(given)
    if preset is None and given.get("weights"):
        preset = "finetune"  # pretrained weights are fine-tuned, not trained as from scratch
    if preset is None and given.get("data") is not None:
        given.setdefault("plan_data", [k for k in PLANNED if k not in given])
    if "epochs" in given:
        given.setdefault("max_minutes", 0.0)
    if isinstance(given.get("widths"), str):
        given["widths"] = parse_widths(given["widths"])
    model_kwargs = {k: given.pop(k) for k in MODEL_KEYS if k in given}
    config = build_config(preset or "default", **given)
    config.model_kwargs = {**config.model_kwargs, **model_kwargs}
    return config, None, None


def parse_widths(text: str) -> list[int]:
    """``--widths``: one positive channel count per stage, comma-separated."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        raise ReslabError(
            f"{text!r} is not a list of stage widths; give one positive whole number of "
            "channels per stage, comma-separated, such as 64,128,256,512"
        )
    return widths


def add_set_argument(parser, example: str) -> None:
    """The benchmarks' ``--set KEY=VALUE ...`` option on an argparse ``parser``, read by
    :func:`parse_overrides`."""
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field that `reslab train` has a flag for, e.g. --set "
        f"{example} (values are JSON, else strings)",
    )


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` words (the benchmarks' ``--set``) as config overrides; a VALUE is JSON
    where it parses (``epochs=44``, ``ema=0.999``, ``augment=false``), else a string
    (``stem=cifar``, ``widths=64,192,384,768``)."""
    overrides = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ReslabError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def train_flags(overrides: dict) -> list[str]:
    """`reslab train` flags for config overrides: --key value, or --key / --no-key."""
    out = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            out += [flag, str(value)]
    return out
