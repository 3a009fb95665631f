"""The one typed configuration behind `reslab train`, its presets and its checks.

A run is ``TrainConfig`` = a preset's values, then the flags the user gave. It is printed at the
start and saved as ``config.json`` in the run folder, and every checkpoint carries it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from reslab.errors import ReslabError, check_whole, finite_positive
from reslab.models import BLOCKS, list_models, model_defaults
from reslab.models.resnet import check_se

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("onecycle", "cosine", "step", "none")
PRECISIONS = ("fp32", "bf16", "auto")


@dataclass
class TrainConfig:
    preset: str = "default"
    # model: a registry name plus constructor overrides (stem, width, ...); in_channels and
    # num_classes come from the data
    model: str = "resnet18"
    model_kwargs: dict = field(default_factory=dict)
    # data: None = Fashion-MNIST (system dir, then data_dir, then download); else an
    # ImageFolder tree with train/ and val/, or one tree split by val_fraction
    data: str | None = None
    data_dir: str | None = None
    val_fraction: float = 0.1
    image_size: int | None = None  # None: 28 for Fashion-MNIST, 64 for folders
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
    batch_size: int = 256
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "onecycle"
    warmup: float = 0.2  # fraction of steps that onecycle spends rising to lr
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # batch augmentation: random crop with crop_padding zero pixels, horizontal flip, random
    # erasing with probability erasing
    augment: bool = True
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
    # forward and backward pass; on only after sam_start of the run's steps (Zhou et al. 2024
    # found SAM late in training finds most of its flatter minima); 0 = off
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
    # bf16 = bfloat16 autocast, fast only where oneDNN has bf16 kernels; auto = bf16 where an
    # epoch is timed at least 1.15x faster in it, else fp32 (resolved before the run starts,
    # so config.json says which)
    precision: str = "fp32"
    channels_last: bool = True
    eval_batch_size: int = 1000
    threads: int = 0  # intra-op CPU threads per process; 0 = the cores shared out evenly
    # local training processes (DistributedDataParallel over gloo, each with its share of the
    # cores); 0 = one per core. For machines whose cores one process cannot keep busy; on the
    # 2-core development machine one process of two threads was faster (README).
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


# Measured numbers for each preset are in README.md ("Training") and benchmarks/results/.
PRESETS: dict[str, dict] = {
    # The tutorial recipe, kept exactly as the reference point: ResNet-18 with its ImageNet
    # stem on a single channel, images resized to 96x96 and scaled to [0, 1] (no
    # normalisation, no augmentation), Adam at 1e-3, batch 256, 5 epochs, constant rate.
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
    # Tuned for a 2-core CPU: a quarter-width ResNet-18 with the "small" stem (stage 1 at
    # 14x14), SGD with Nesterov momentum on a one-cycle rate, label smoothing, crop and flip on
    # batches, flip test-time augmentation. No random erasing: this small model underfits
    # (train 91.7% < test 92.2% with it; 92.53% test without; benchmarks/results/).
    # channels_last, and the precision timed on the machine at hand (auto): on an AVX2-only
    # CPU bf16 convolutions run PyTorch's reference kernels, measured 6x slower than fp32, so
    # auto keeps fp32 there untimed; on a Xeon with AVX512-BF16 bf16 was no faster for this
    # width at 28x28 (2,372 against 2,574 img/s; README), so auto keeps fp32 there too; where
    # bf16 is 1.15x faster or more (the issue measured 2.1x), auto takes it.
    # 20 epochs at batch 256 (lr 0.2, scaled with the batch): 93.64% in 8.1 min on the idle
    # 2-core Xeon at 2,764 img/s; 8 epochs at batch 128 had given 92.41%. At most 9.5
    # minutes (max_minutes), so that `reslab train` keeps to its 10 minutes on a slower CPU
    # too, with fewer epochs there (README).
    "default": dict(
        model="resnet18",
        model_kwargs={"stem": "small", "width": 0.25},
        epochs=20,
        max_minutes=9.5,
        batch_size=256,
        lr=0.2,
        erasing=0.0,
        precision="auto",
    ),
    # The highest accuracy within an hour on a 2-core CPU: ResNet-18 at 1/4 width with the
    # "cifar" stem, so stage 1 works at the full 28x28 (widths 16/32/64/128), batch 256 with an
    # EMA of the weights (decay 0.998 per step), 48 epochs or as many as fit in 57 minutes on
    # the machine at hand (max_minutes), the schedule made for that many. 36 epochs gave
    # 95.03% in 40.7 min on the Xeon at about 1,000 img/s (94% first at epoch 22); on an H200
    # (same numerics) 36 epochs gave 95.00%, 48 epochs 95.30%, 24 epochs 94.67%, so the
    # epochs are the lever and the budget decides how many (about 48 on that Xeon, about 20
    # on the AVX2 EPYC). The same recipe at 1/2 width with the "small" stem (stage 1 at 14x14)
    # costs the same per image and gave 94.61% in 44.5 min; the CIFAR ResNet-20 gave 94.88%
    # in 47.9 min. No random erasing or CutMix: erasing cost 0.14 points even with 44 epochs,
    # CutMix 0.5 cost 0.3 in a GPU probe; weight decay 1e-3 scored 94.93% on the H200 (README).
    # With the crops padded with black instead of grey, 48 epochs gave 95.40% in 42.7 min on
    # an AMD EPYC with AVX512-BF16 (bf16), 95.24% with seed 1: 95.32% on average against 95.30%
    # with grey padding there, so the colour does not measurably matter; black is what
    # torchvision's RandomCrop pads with and the dataset's background.
    # The last evaluation also averages over the image moved one pixel each way (10 views
    # with the mirrors): on the seed-2 run's checkpoint (95.39% with the mirror alone, bf16)
    # it scored 95.56%, and the preset's runs with it 95.55% (seed 0, 43.1 min on that EPYC)
    # and 95.35% (seed 1), against 95.39% and 95.23% for the mirror alone; seed 3 95.34%, so
    # four seeds average 95.45% (README). Stage 4 at 192 channels instead of 128 (--widths
    # 64,128,256,768) took 1.25x the step time and gave 95.33% with seed 0: not adopted.
    # Neither was lr 0.1 (95.39% over seeds 0, 1, 3 against 95.41% for lr 0.2) nor
    # pre-activation blocks (95.34% with seed 0), nor ResNet-D shortcuts with zero-initialised
    # branches (--shortcut D --zero-init-residual: 95.41% over seeds 0-3 against 95.45%), nor
    # SAM on the last quarter of the steps (--sam 0.05: 95.41% and 95.38% for seeds 0 and 1,
    # 95.37% and 95.37% for the same runs continued from epoch 36 without it), nor the images
    # upsampled to 32x32 (--image-size 32, about 1.1x the step time: 95.52% and 95.30%), nor
    # squeeze-and-excitation (--se 4: 95.21% with seed 0), nor the last 4 epochs on whole
    # images (--clean-epochs 4: the same to epoch 44, then 95.44% with seed 0), nor stages
    # 2-4 at 1.5x (--widths 64,192,384,768: 1.4-1.5x the step time; 95.45% over four seeds
    # on a Xeon with AMX against 95.34% for three of this preset there, but 95.34% against
    # 95.33% over 7 seeds each in a seed screen on an H200 (benchmarks/seed_screen.py), and
    # 95.24% in the 40 epochs the budget left it on the EPYC; a wider stage 1 costs about
    # 2x, README), nor half the warm-up (--warmup 0.1: 95.31% on that Xeon, where this
    # preset's seed 0 scored 95.36%), nor weight averaging along a constant rate over the
    # last 12 epochs (SWA, 95.29% over 6 seeds on the H200). This preset's eight CPU runs
    # average 95.39% (95.30-95.56%).
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
}


def build_config(preset: str = "default", **overrides) -> TrainConfig:
    """A preset's config with ``overrides`` (only the values the user actually gave)."""
    if preset not in PRESETS:
        raise ReslabError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = replace(TrainConfig(preset=preset, **PRESETS[preset]), **overrides)
    validate(config)
    return config


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
    if config.model not in list_models():
        model_defaults(config.model)  # raises, naming the close matches
    for name, allowed in (
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("precision", PRECISIONS),
    ):
        if getattr(config, name) not in allowed:
            raise ReslabError(f"--{name} must be one of {allowed}, got {getattr(config, name)!r}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        check_whole(name.replace("_", "-"), getattr(config, name))
    check_whole("crop-padding", config.crop_padding, least=0)
    check_whole("clean-epochs", config.clean_epochs, least=0)
    check_whole("tta-shift", config.tta_shift, least=0)
    finite_positive("lr", config.lr)
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
    finite_positive("max-minutes", config.max_minutes, allow_zero=True)
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
    if min(config.crop_padding, config.workers, config.threads, config.processes) < 0:
        raise ReslabError("--crop-padding, --workers, --threads and --processes must be >= 0")
    if not isinstance(config.save_every, int) or config.save_every < 0:
        raise ReslabError(f"--save-every must be a whole number >= 0, got {config.save_every}")
