"""`reslab train`: the flags given, as a dict, to reslab.engine.config.config_from_flags."""

from __future__ import annotations

import argparse

from reslab.engine.config import (
    CROPS,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    SCHEDULES,
    config_from_flags,
    parse_widths,
    validate,
)

# benchmarks/seed_screen.py still imports these from here; they live in reslab.engine.config
from reslab.engine.config import add_set_argument as add_set_argument
from reslab.engine.config import parse_overrides as parse_overrides
from reslab.engine.config import train_flags as train_flags
from reslab.engine.distributed import World, check_batch, cpu_cores, in_launched_world, relaunch
from reslab.engine.train import fit
from reslab.errors import ReslabError
from reslab.models.blocks import SHORTCUTS
from reslab.precision import BF16_MIN_SPEEDUP


def _bool(parser, name: str, help: str) -> None:
    parser.add_argument(
        name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help
    )


def stage_widths(text: str) -> list[int]:
    """argparse type for ``--widths`` (:func:`reslab.engine.config.parse_widths`)."""
    try:
        return parse_widths(text)
    except ReslabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a ResNet on Fashion-MNIST or an image folder",
        description="Train a model and write runs/<date>-<model>/ (config.json, metrics.jsonl, "
        "last.pt, best.pt, curves.png, confusion.png). Flags not given take the preset's "
        "values; the full config is printed at the start.",
    )
    add_config_flags(parser)
    parser.set_defaults(func=run)


def add_config_flags(parser) -> None:
    """Every flag of a training config (`reslab train`, `reslab lr-find`)."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="seed: the tutorial recipe; default: tuned for a small CPU; best: highest accuracy "
        "within an hour; finetune: pretrained weights on a folder (frozen head epoch, then "
        "discriminative rates). Not given: finetune with --weights, else default, and a --data "
        "folder run chooses the batch size, rate and epochs not given from the folder's size",
    )
    _model_flags(parser)
    _data_flags(parser)
    _schedule_flags(parser)
    _augment_flags(parser)
    _finetune_flags(parser)
    _run_flags(parser)


def _adder(parser):
    """``parser.add_argument`` with every flag defaulting to "not given", so that only what
    the user typed overrides the preset."""
    return lambda *a, **k: parser.add_argument(*a, default=argparse.SUPPRESS, **k)


def _model_flags(parser) -> None:
    """Flags of the network: which model and its constructor arguments."""
    add = _adder(parser)
    add(
        "--model",
        help="any name from `reslab models` (the preset's stem and width still apply, except "
        "with --weights; default: the preset's, or the architecture a --weights file records)",
    )
    add(
        "--weights",
        metavar="SOURCE",
        help="start from pretrained weights: imagenet (torchvision's default for --model "
        "resnet18..152), IMAGENET1K_V1 or IMAGENET1K_V2 (downloaded into $TORCH_HOME once, "
        "read from there after), a .pth/.pt/.safetensors state dict (torchvision or timm), or a "
        "reslab checkpoint or run folder. Their input size, resize and crop, mean and std "
        "become the run's, and the preset's stem and width are dropped; a head for other "
        "classes is replaced (default: none, random weights)",
    )
    add("--stem", choices=("imagenet", "cifar", "small"), help="override the model's stem")
    add("--width", type=float, help="channel width multiplier")
    add(
        "--widths",
        type=stage_widths,
        metavar="C,C,...",
        help="channels of each stage before --width multiplies them (ResNet-18: 64,128,256,512; "
        "the best preset's 1/4 width makes that 16,32,64,128)",
    )
    add(
        "--shortcut",
        choices=SHORTCUTS,
        help="A = zero-padded identity, B = 1x1 projection where the shape changes, C = on "
        "every block (He et al. 2015); D = B with a 2x2 average pool before the projection "
        "where the map shrinks (He et al. 2019, ResNet-D). Default: the model's own",
    )
    add(
        "--se",
        type=int,
        metavar="R",
        help="squeeze-and-excitation in every block (Hu et al. 2018): each residual branch's "
        "channels are gated by a bottleneck of channels/R units on their means; 0 = off "
        "(default)",
    )
    _bool(
        parser,
        "--zero-init-residual",
        "start each residual branch's last batch norm at zero, so every block begins as the "
        "identity (Goyal et al. 2017)",
    )


def _data_flags(parser) -> None:
    """Flags of the data: Fashion-MNIST or an image folder, and how it is read."""
    add = _adder(parser)
    add(
        "--data",
        metavar="FOLDER",
        help="an ImageFolder tree instead of Fashion-MNIST: FOLDER/train/<class>/<image> beside "
        "FOLDER/val/ (or test/), or FOLDER/<class>/<image> split by --val-fraction",
    )
    add("--data-dir", help="where Fashion-MNIST files are, or are downloaded to")
    _bool(parser, "--verify", "check Fashion-MNIST files against the release's SHA-256")
    add(
        "--val-fraction",
        type=float,
        help="validation share when FOLDER has no train/ and val/ (or test/)",
    )
    add(
        "--image-size",
        type=int,
        help="side the model sees (Fashion-MNIST 28, folders 64; with --weights theirs, 224 "
        "for ImageNet weights)",
    )
    add(
        "--resize",
        type=int,
        metavar="N",
        help="folders: evaluate on images whose shorter side is resized to N, centre-cropped to "
        "--image-size (0 = squash whole images; default 0, with ImageNet weights 256 or 232)",
    )
    add("--workers", type=int, help="DataLoader workers decoding image-folder files")
    _bool(parser, "--strict", "stop on an unreadable image-folder file (default: skip, warn)")


def _schedule_flags(parser) -> None:
    """Flags of the optimisation: epochs, time budget, batch, optimizer and rate schedule."""
    add = _adder(parser)
    add(
        "--epochs",
        type=int,
        help="epochs to train; given alone it is exact (the preset's time budget is dropped "
        "unless --max-minutes is given too)",
    )
    add(
        "--max-minutes",
        type=float,
        metavar="M",
        help="fit the run to M minutes of wall time: a few steps are timed first and "
        "min(--epochs, what fits) epochs are planned, the schedule made for that many, then "
        "planned again after each epoch from the median of the latest 3 epochs' times, the "
        "schedule stretched or shrunk from there without a jump in the rate "
        "(0 = no limit; presets: default 9.5, speedrun 4.6, best 57, seed none)",
    )
    add(
        "--target",
        type=float,
        metavar="PCT",
        help="a test accuracy in percent: print and record in metrics.jsonl the first epoch, "
        "step and wall time at which the run reached it (default: none)",
    )
    add("--batch-size", type=int, help="images per optimizer step (presets: 256)")
    add("--lr", type=float, help="peak learning rate")
    add(
        "--optimizer",
        choices=OPTIMIZERS,
        help="sgd = SGD with Nesterov momentum 0.9 (default and best); adam (seed) or adamw",
    )
    add(
        "--schedule",
        choices=SCHEDULES,
        help="the rate over the run: onecycle = warm-up then cosine to zero (default and best); "
        "cosine; step = x0.1 at 50%% and 75%% of the steps; none = constant (seed)",
    )
    add(
        "--warmup",
        type=float,
        metavar="F",
        help="share of the steps that onecycle spends rising from lr/25 to lr (default 0.2)",
    )
    add(
        "--weight-decay",
        type=float,
        help="L2 decay of the weights, not of batch norm or biases (default and best 5e-4)",
    )
    add(
        "--label-smoothing",
        type=float,
        help="share of each target spread over the other classes (default and best 0.1)",
    )


def _finetune_flags(parser) -> None:
    """Flags of fine-tuning's two phases: the frozen head, then discriminative rates."""
    add = _adder(parser)
    add(
        "--freeze-epochs",
        type=int,
        metavar="N",
        help="train the head alone for the first N epochs, the body frozen, on a one-cycle of "
        "their own; then the whole network on another (finetune 1, others 0 = off)",
    )
    add(
        "--freeze-lr",
        type=float,
        help="peak rate of the frozen epochs (finetune 2e-3; 0 = twice --lr)",
    )
    _bool(
        parser,
        "--train-bn",
        "while the body is frozen its batch norms keep training (statistics, scale and shift), "
        "as fastai does; default off: eval mode, as Keras and timm",
    )
    add(
        "--lr-spread",
        type=float,
        metavar="R",
        help="discriminative rates: the stem trains at --lr / R, the head at --lr, the stages "
        "between on a geometric slice (finetune 100, others 1 = one rate)",
    )
    _bool(
        parser,
        "--cache-features",
        "the frozen epochs train the head on the body's features of the un-augmented images, "
        "computed once instead of once an epoch (default off)",
    )


def _augment_flags(parser) -> None:
    """Flags of augmentation, weight averaging, SAM and test-time augmentation."""
    add = _adder(parser)
    _bool(parser, "--augment", "random crop with padding, flip and random erasing on batches")
    add(
        "--crop",
        choices=CROPS,
        help="the training crop: pad = moved by up to --crop-padding pixels; resized = a window "
        "of 8-100%% of the image, aspect ratio 3/4 to 4/3, resized to --image-size, as for "
        "photos (default pad; resized with ImageNet weights)",
    )
    add(
        "--crop-padding",
        type=int,
        metavar="N",
        help="the random crop's black border: each image moves by up to N pixels (default 2)",
    )
    add("--erasing", type=float, help="random-erasing probability per image")
    add(
        "--clean-epochs",
        type=int,
        metavar="N",
        help="train the last N epochs on whole images: flip only, no crop, erasing or CutMix "
        "(default 0 = augment to the end)",
    )
    add(
        "--cutmix",
        type=float,
        metavar="P",
        help="CutMix: paste a box from another image of the batch into a share P of the "
        "batches, mixing the labels by area (default 0 = off)",
    )
    add("--ema", type=float, help="weight-averaging decay per step, 0 = off")
    add(
        "--sam",
        type=float,
        metavar="RHO",
        help="sharpness-aware minimisation (Foret et al. 2021): each step's gradient is taken "
        "at the weights moved RHO along the batch's gradient, a second forward and backward "
        "pass that --max-minutes plans for (typical RHO 0.05; default 0 = off)",
    )
    add(
        "--sam-start",
        type=float,
        metavar="F",
        help="SAM only on the steps after this share of the schedule (of its second cycle "
        "with --freeze-epochs; default 0.75: the last quarter, where Zhou et al. 2024 found "
        "most of its gain; 0 = every step)",
    )
    _bool(parser, "--tta", "average predictions over each test image and its mirror image")
    add(
        "--tta-shift",
        type=int,
        metavar="N",
        help="the last epoch's evaluation (and eval, predict) also averages over each test "
        "image moved N pixels right, left, down and up: 10 views with --tta, 5 without; "
        "earlier epochs skip them (best 1, others 0 = off)",
    )


def _run_flags(parser) -> None:
    """Flags of speed, precision, processes and the run folder."""
    add = _adder(parser)
    add(
        "--device",
        help="cpu (default), or cuda / cuda:N for an NVIDIA GPU; fp32 stays fp32 there (no TF32)",
    )
    add(
        "--precision",
        choices=PRECISIONS,
        help="bf16 = bfloat16 autocast: slow without native bf16 (AVX512-BF16, AMX), and with "
        "it faster on some CPUs and slower on others; auto = time an epoch in both where bf16 "
        f"is native and keep bf16 if {BF16_MIN_SPEEDUP:g}x faster, the CPU's AMX deciding "
        "when timing cannot tell, else fp32; fp32 on a GPU "
        "(presets: default and best auto, seed fp32)",
    )
    _bool(
        parser, "--channels-last", "NHWC memory layout (oneDNN's preferred layout for convolutions)"
    )
    add("--threads", type=int, help="CPU threads per process (default: the cores shared out)")
    add(
        "--processes",
        type=int,
        metavar="N",
        help="train in N local processes with DistributedDataParallel (0: one per core), each "
        "with its share of the cores; the global batch and the sequence of updates stay those "
        "of one process (default 1)",
    )
    add(
        "--seed",
        type=int,
        help="seed for the weights, the batches and the augmentation (default 0)",
    )
    add("--out", help="run folder (default runs/<date>-<model>, numbered if it exists)")
    parser.add_argument(
        "--force",
        action="store_true",
        default=argparse.SUPPRESS,
        help="write into an existing --out",
    )
    add("--resume", metavar="CKPT", help="continue a run from last.pt or its folder")
    add(
        "--save-every",
        type=int,
        metavar="N",
        help="also save last.pt every N steps (atomically; default: at epoch ends)",
    )
    _bool(parser, "--sync-bn", "with several processes, batch-norm statistics over all of them")


def config_from_args(args: argparse.Namespace):
    """(config, checkpoint payload or None, run folder or None) from parsed arguments: the
    flags given, by config field name, to :func:`reslab.engine.config.config_from_flags`."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "preset", "argv")}
    return config_from_flags(args.preset, given)


def run(args: argparse.Namespace) -> int:
    config, payload, run_dir = config_from_args(args)
    processes = config.processes or cpu_cores()
    if processes > 1 and not in_launched_world():
        validate(config)  # a user's mistake is reported once, before any process starts
        check_batch(World(size=processes), config.batch_size)
        return relaunch(processes, args.argv, config.threads)
    fit(config, payload=payload, run_dir=run_dir)
    return 0
