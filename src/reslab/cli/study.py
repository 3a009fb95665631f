"""`reslab study gradients|degradation|blocks|shortcuts|responses`: why residual networks work,
one command each (shortcuts and responses in :mod:`reslab.cli.study_variants`).

Each study prints a table and writes its numbers (JSON) and figure to a new run folder,
``runs/<date>-study-<name>/`` (``-2``, ``-3``, ... when that folder exists; never overwritten).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from reslab.analysis.degradation import (
    BUDGETS,
    budget_config,
    claims_title,
    degradation_study,
    network_rows,
    plan_epochs,
    plot_degradation,
    seconds_per_epoch,
    time_step,
)
from reslab.analysis.gradients import (
    GradientConfig,
    gradient_study,
    plot_gradients,
    summary_rows,
)
from reslab.analysis.summary import block_arithmetic, summarize_name
from reslab.bench import machine_info
from reslab.cli import study_variants
from reslab.cli.summary import parse_shape
from reslab.data import fashion_mnist
from reslab.engine.checkpoint import atomic_write
from reslab.errors import ReslabError
from reslab.models.resnet import IMAGENET_DEPTHS
from reslab.precision import PRECISIONS, format_seconds, resolve_precision


def new_run_dir(root: str | Path, study: str) -> Path:
    base = Path(root) / f"{date.today().isoformat()}-study-{study}"
    path, n = base, 2
    while True:
        try:
            path.mkdir(parents=True)  # fails if it exists: an earlier run is never overwritten
            return path
        except FileExistsError:
            path, n = base.with_name(f"{base.name}-{n}"), n + 1


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ReslabError(f"expected comma-separated integers, got {text!r}") from None


def write_json(path: Path, data: dict) -> None:
    text = (json.dumps(data, indent=1) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


def finish(result: dict, started: float, out: Path, name: str, copy: str | None) -> list[Path]:
    """Record the wall time and the machine's load at the end, write ``name`` into the run
    folder and, with ``--out``, a copy there; the paths written."""
    result["minutes"] = (time.perf_counter() - started) / 60
    result["machine"]["load_average_end"] = os.getloadavg()
    paths = [out / name] + ([Path(copy)] if copy else [])
    for path in paths:
        write_json(path, result)
    return paths


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "study",
        help="why residual networks work: gradient flow, degradation, block arithmetic, "
        "shortcut variants, layer responses",
        description="Studies that show why residual networks work (He et al. 2015): gradient "
        "norms by depth, the degradation problem of plain networks, and the arithmetic of "
        "basic and bottleneck blocks.",
    )
    studies = parser.add_subparsers(title="studies", metavar="STUDY", required=True)
    _gradients_parser(studies)
    _degradation_parser(studies)
    _blocks_parser(studies)
    study_variants.register(studies, _common_flags())


def _common_flags() -> dict[str, dict]:
    """The flags every training study takes, as add_argument options by flag."""
    return {
        "--data-dir": dict(default=None, help="folder with the Fashion-MNIST IDX files"),
        "--runs": dict(default="runs", help="where run folders go (default: runs)"),
        "--seed": dict(type=int, default=0, help="seed for weights and batches"),
        # on a CPU shared with other jobs, one thread avoids waiting on the others' cores
        "--threads": dict(type=int, default=None, help="CPU threads (default: torch's)"),
        "--verify": dict(
            action=argparse.BooleanOptionalAction,
            default=True,
            help="check Fashion-MNIST files against the release's SHA-256 (default: on)",
        ),
    }


def _gradients_parser(studies) -> None:
    g = studies.add_parser(
        "gradients",
        help="gradient norm of every conv layer, plain vs residual, by depth",
        description="For each network and its plain twin: one forward/backward pass on a "
        "Fashion-MNIST batch at initialisation and after a short training; the gradient norm "
        "of every conv weight, by layer. Writes gradients.json and gradients.png.",
    )
    d = GradientConfig()
    g.add_argument(
        "--models",
        default=",".join(d.names),
        help=f"residual networks; each gets its plain_ twin (default: {','.join(d.names)})",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    g.add_argument(
        "--steps", type=int, default=d.steps, help="training steps (default: %(default)s)"
    )
    g.add_argument("--lr", type=float, default=d.lr, help="(default: %(default)s)")
    for flag, options in _common_flags().items():
        g.add_argument(flag, **options)
    g.set_defaults(func=run_gradients)


def _degradation_parser(studies) -> None:
    dg = studies.add_parser(
        "degradation",
        help="train plain-N and ResNet-N with one budget (the paper's Figure 6)",
        description="Train plain and residual CIFAR networks at two or more depths with the "
        "same recipe (He et al. 2015, section 4.2) on Fashion-MNIST, over seeds; plot training "
        "(dashed) and test (bold) error by epoch as the paper's Figure 6 does, and say which of "
        "its claims held: plain-deep trains worse than plain-shallow, ResNet-deep trains and "
        "tests better than ResNet-shallow. A flag left out takes the --budget's value.",
    )
    dg.add_argument(
        "--budget",
        default="default",
        choices=sorted(BUDGETS),
        help="default: full training and test sets, 2 seeds, crop+flip, small stem, "
        f"{BUDGETS['default']['epochs']} epochs; paper: the paper's 64k steps (137 epochs) "
        "at depths 20,32,44,56,110; small: 3,000 images, 5 epochs, one seed (default: default)",
    )
    dg.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="plan the epochs to fit this many minutes of the whole study, from a timed step "
        "of each network on this machine (default: the budget's epochs)",
    )
    helps = {
        "depths": "CIFAR depths 6n+2, comma-separated (default: 20,56)",
        "epochs": "epochs (default: the budget's)",
        "train_size": "random subset of the 60,000 training images (default: the budget's)",
        "test_size": "random subset of the 10,000 test images (default: the budget's)",
        "batch_size": "(default: 128, as in the paper)",
        "seeds": "networks per depth and kind, seeds --seed, --seed + 1, ... (default: the budget's)",
        "pad": "random crop from a border of this many pixels, and flips; 0: no augmentation "
        "(default: the budget's)",
    }
    for name, text in helps.items():
        dg.add_argument(
            f"--{name.replace('_', '-')}",
            type=int_list if name == "depths" else int,
            default=None,
            help=text,
        )
    dg.add_argument(
        "--lr", type=float, default=None, help="/10 at 50%% and 75%% of the steps (default: 0.1)"
    )
    dg.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="share of the steps at lr/10 for networks of 110 layers or more (default: the "
        "budget's)",
    )
    dg.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 where the CPU computes it natively and a step is timed faster "
        "(reslab.precision's rule), else fp32 (default: auto)",
    )
    dg.add_argument(
        "--stem",
        default=None,
        choices=("cifar", "small"),
        help="cifar: the paper's (stages at 28, 14, 7 px); small: a 3x3/2 max pool after it "
        "(14, 7, 4 px), about 2.5x cheaper (default: the budget's)",
    )
    dg.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC tensors in memory (default: the budget's)",
    )
    dg.add_argument("--out", default=None, help="also write the JSON here (default: none)")
    for flag, options in _common_flags().items():
        dg.add_argument(flag, **options)
    dg.set_defaults(func=run_degradation)


def _blocks_parser(studies) -> None:
    b = studies.add_parser(
        "blocks",
        help="basic vs bottleneck: weights and multiply-adds per block and per network",
        description="Weights and multiply-adds of one basic block (two 3x3 convs) and one "
        "bottleneck (1x1, 3x3, 1x1) at a given width, then of each ImageNet-depth network.",
    )
    b.add_argument("--channels", type=int, default=256, help="block width (default: 256)")
    b.add_argument("--size", type=int, default=56, help="feature map side (default: 56)")
    b.add_argument(
        "--input",
        type=parse_shape,
        default=(3, 224, 224),
        help="network input C,H,W (default: 3,224,224)",
    )
    b.add_argument("--runs", **_common_flags()["--runs"])
    b.set_defaults(func=run_blocks)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ReslabError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def run_gradients(args) -> int:
    console = Console()
    set_threads(args.threads)
    config = GradientConfig(
        names=tuple(args.models.split(",")),
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
    )
    config.check()
    train = fashion_mnist.load("train", args.data_dir, check_hash=args.verify)
    console.print(f"config: {config}")
    result = gradient_study(
        config,
        train.images,
        train.labels,
        on_model=lambda name: console.print(f"  {name} ...", highlight=False),
    )
    out = new_run_dir(args.runs, "gradients")
    write_json(out / "gradients.json", result)
    plot_gradients(result, out / "gradients.png")
    table = Table(title=f"conv weight gradient norms, at init and after {config.steps} SGD steps")
    for column in ("network", "when", "convs", "loss", "first", "last", "first/last"):
        table.add_column(
            column,
            justify="left" if column in ("network", "when") else "right",
            no_wrap=column == "network",
        )
    for row in summary_rows(result):
        table.add_row(
            row["name"],
            row["moment"],
            str(row["layers"]),
            f"{row['loss']:.2f}",
            f"{row['first']:.3g}",
            f"{row['last']:.3g}",
            f"{row['ratio']:.3g}",
        )
    console.print(table)
    console.print(f"wrote {out / 'gradients.json'} and {out / 'gradients.png'}")
    return 0


def degradation_config(args):
    config = budget_config(
        args.budget,
        **{
            name: getattr(args, name)
            for name in (
                "depths",
                "epochs",
                "train_size",
                "test_size",
                "batch_size",
                "seeds",
                "pad",
                "lr",
                "warmup",
                "stem",
                "channels_last",
                "minutes",
            )
        },
        seed=args.seed,
        precision="fp32",
    )
    config.check()
    config.precision, _ = resolve_precision(
        args.precision, measure=lambda p: time_step(config, p), what="a training step"
    )
    if config.minutes:
        epoch = seconds_per_epoch(config)
        config.epochs = plan_epochs(config, epoch)
        print(
            f"time budget {config.minutes:g} min: an epoch of the {2 * len(config.depths)} "
            f"networks and {config.seeds} seed(s) takes about {format_seconds(epoch)} here "
            f"(timed steps), so {config.epochs} epochs; --epochs sets them instead",
            flush=True,
        )
    return config


def run_degradation(args) -> int:
    console = Console()
    set_threads(args.threads)
    config = degradation_config(args)
    train = fashion_mnist.load("train", args.data_dir, check_hash=args.verify)
    test = fashion_mnist.load("test", args.data_dir, check_hash=args.verify)
    out = new_run_dir(args.runs, "degradation")
    console.print(f"config: {config}\nrun folder: {out}")
    start = time.perf_counter()
    machine = machine_info()
    result = degradation_study(
        config, (train.images, train.labels), (test.images, test.labels), epoch_printer(console)
    )
    result["machine"] = machine
    paths = finish(result, start, out, "degradation.json", args.out)
    plot_degradation(result, out / "degradation.png")
    table = Table(title=f"after {config.epochs} epochs ({result['minutes']:.1f} min in all)")
    for column in ("network", "params", "seeds", "train error", "test error", "test range"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for row in network_rows(result):
        low, high = row["test_range"]
        table.add_row(
            row["name"],
            f"{row['params']:,}",
            str(row["seeds"]),
            f"{row['train_error']:.2%}",
            f"{row['test_error']:.2%}",
            f"{low:.2%}-{high:.2%}",
        )
    console.print(table)
    for claim in result["claims"]:
        verdict = "holds" if claim["held"] else "DOES NOT HOLD"
        console.print(
            f"  {claim['text']}: {verdict} ({claim['deep']:.2%} against {claim['shallow']:.2%})",
            highlight=False,
            soft_wrap=True,  # one line per claim, whatever the terminal's width, so logs grep
        )
    console.print(claims_title(result["claims"]), highlight=False, soft_wrap=True)
    console.print(f"wrote {', '.join(map(str, paths))} and {out / 'degradation.png'}")
    return 0


def epoch_printer(console: Console):
    def report(name: str, row: dict) -> None:
        console.print(
            f"  {name:<24} epoch {row['epoch']:>3}  train error {row['train_error']:6.2%}  "
            f"test error {row['test_error']:6.2%}  ({row['seconds']:.0f} s)",
            highlight=False,
        )

    return report


def run_blocks(args) -> int:
    console = Console()
    channels, size = args.channels, args.size
    # He et al. 2015, Figure 5: a bottleneck on 256 channels costs about what a basic block on
    # 64 does; the third row shows that pairing
    blocks = [
        block_arithmetic("basic", channels, size),
        block_arithmetic("bottleneck", channels, size),
        block_arithmetic("basic", channels // 4, size),
    ]
    table = Table(title=f"one block at {size}x{size}")
    for column in ("block", "channels", "conv weights", "params (with BN)", "multiply-adds"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for r in blocks:
        table.add_row(
            r["kind"],
            str(r["channels"]),
            f"{r['conv_weights']:,}",
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:,.1f} M",
        )
    console.print(table)
    ratio = blocks[0]["conv_weights"] / blocks[1]["conv_weights"]
    console.print(
        f"at {channels} channels two 3x3 convolutions hold {ratio:.1f}x the weights of a "
        f"bottleneck ({blocks[0]['conv_weights']:,} against {blocks[1]['conv_weights']:,})"
    )

    networks = []
    table = Table(title=f"networks, input {'x'.join(map(str, args.input))}")
    for column in ("network", "block", "blocks per stage", "params", "multiply-adds"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for depth, (kind, layers) in IMAGENET_DEPTHS.items():
        s = summarize_name(f"resnet{depth}", args.input)
        networks.append({"name": s.name, "block": kind, "params": s.params, "macs": s.macs})
        table.add_row(
            s.name, kind, "-".join(map(str, layers)), f"{s.params:,}", f"{s.macs / 1e9:.2f} G"
        )
    console.print(table)
    out = new_run_dir(args.runs, "blocks")
    write_json(out / "blocks.json", {"blocks": blocks, "networks": networks})
    console.print(f"wrote {out / 'blocks.json'}")
    return 0
