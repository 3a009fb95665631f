"""`reslab study shortcuts|responses`: He et al. 2016's shortcut and ordering variants, and
He et al. 2015's layer responses, each trained on one recipe and printed as a table."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from reslab.analysis.degradation import DegradationConfig
from reslab.analysis.responses import DEFAULT as RESPONSES
from reslab.analysis.responses import plot_responses, response_study
from reslab.analysis.shortcuts import DEFAULT as SHORTCUTS
from reslab.analysis.shortcuts import SOURCE, plot_shortcuts, shortcut_study
from reslab.bench import machine_info
from reslab.data import fashion_mnist


def add_recipe_flags(parser, defaults: dict) -> None:
    """The training budget flags of a study, with ``defaults`` (fields of DegradationConfig)
    over the recipe's own."""
    base = DegradationConfig(**defaults)
    from reslab.cli.study import int_list  # the study command's parsers share one reader

    parser.add_argument(
        "--depths",
        type=int_list,
        default=base.depths,
        help=f"CIFAR depths 6n+2 (default: {','.join(map(str, base.depths))})",
    )
    for name, text in (
        ("epochs", "epochs"),
        ("train_size", "random subset of the 60,000 training images"),
        ("test_size", "random subset of the 10,000 test images"),
        ("seeds", "networks per variant, seeds --seed, --seed + 1, ..."),
        ("pad", "random crop from a border of this many pixels, and flips; 0: none"),
        ("batch_size", "batch"),
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(base, name),
            help=f"{text} (default: %(default)s)",
        )
    parser.add_argument(
        "--lr", type=float, default=base.lr, help="/10 at 50%% and 75%% (default: %(default)s)"
    )
    parser.add_argument(
        "--stem",
        default=base.stem,
        choices=("cifar", "small"),
        help="cifar: the paper's (stages at 28, 14, 7 px); small: a 3x3/2 max pool after it "
        "(14, 7, 4 px), about 2.5x cheaper (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON here (default: none)")
    parser.set_defaults(channels_last=base.channels_last)


def recipe(args) -> DegradationConfig:
    config = DegradationConfig(
        depths=args.depths,
        epochs=args.epochs,
        train_size=args.train_size,
        test_size=args.test_size,
        seeds=args.seeds,
        pad=args.pad,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        stem=args.stem,
        channels_last=args.channels_last,
    )
    config.check(min_depths=1)
    return config


def register(studies, common_flags: dict) -> None:
    s = studies.add_parser(
        "shortcuts",
        help="shortcut variants and activation orderings (He et al. 2016, Tables 1 and 2)",
        description="Train ResNet-N on Fashion-MNIST with each shortcut variant (identity, "
        "constant scaling 0.5, exclusive gating, shortcut-only gating, 1x1 conv shortcut, "
        "dropout shortcut) and each activation ordering (original, BN after addition, ReLU "
        "before addition, ReLU-only pre-activation, full pre-activation); print the "
        "final errors and the ordering found next to the paper's. Writes shortcuts.json "
        "and shortcuts.png.",
    )
    add_recipe_flags(s, SHORTCUTS)
    r = studies.add_parser(
        "responses",
        help="std of each 3x3 layer's response, plain vs residual (He et al. 2015, Figure 7)",
        description="Train plain-N and ResNet-N, then measure the standard deviation of every "
        "3x3 layer's response (after batch norm, before the ReLU or addition) on the test "
        "images; plot it by layer and sorted, and say whether the paper's findings hold. "
        "Writes responses.json and responses.png.",
    )
    add_recipe_flags(r, RESPONSES)
    for parser, func in ((s, run_shortcuts), (r, run_responses)):
        for flag, options in common_flags.items():
            parser.add_argument(flag, **options)
        parser.set_defaults(func=func)


def run_study(args, name: str, study, plot):
    """Load the data, run ``study``, write its JSON and figure to a new run folder."""
    from reslab.cli.study import epoch_printer, finish, new_run_dir, set_threads

    console = Console()
    set_threads(args.threads)
    config = recipe(args)
    train = fashion_mnist.load("train", args.data_dir, check_hash=args.verify)
    test = fashion_mnist.load("test", args.data_dir, check_hash=args.verify)
    out = new_run_dir(args.runs, name)
    console.print(f"config: {config}\nrun folder: {out}")
    started, machine = time.perf_counter(), machine_info()
    result = study(
        config, (train.images, train.labels), (test.images, test.labels), epoch_printer(console)
    )
    result["machine"] = machine
    paths = finish(result, started, out, f"{name}.json", args.out)
    plot(result, out / f"{name}.png")
    return console, result, paths + [out / f"{name}.png"]


def pct(value) -> str:
    return "fail" if value is None else f"{value:.2%}"


def run_shortcuts(args) -> int:
    console, result, paths = run_study(args, "shortcuts", shortcut_study, plot_shortcuts)
    table = Table(title=f"final errors ({result['minutes']:.1f} min in all); paper: {SOURCE}")
    for column in ("group", "variant", "depth", "train error", "test error", "paper"):
        table.add_column(column, justify="left" if column in ("group", "variant") else "right")
    for row in result["rows"]:
        table.add_row(
            row["group"],
            row["variant"],
            str(row["depth"]),
            pct(row["train_error"]),
            pct(row["test_error"]),
            pct(row["paper_error"]),
        )
    console.print(table)
    for found in result["orderings_found"]:
        verdict = "agrees" if found["paper_best_holds"] else "DISAGREES"
        console.print(
            f"  {found['group']}, ResNet-{found['depth']}: measured "
            f"{' < '.join(found['measured'])}; paper {' < '.join(found['paper'])}; "
            f"paper's best ({found['paper_best']}) best here: {verdict}",
            highlight=False,
            soft_wrap=True,  # one line per claim, whatever the terminal's width, so logs grep
        )
    console.print(f"wrote {', '.join(map(str, paths))}")
    return 0


def run_responses(args) -> int:
    console, result, paths = run_study(args, "responses", response_study, plot_responses)
    table = Table(title=f"response std by layer ({result['minutes']:.1f} min in all)")
    for column in ("network", "layers", "mean std", "largest", "smallest", "test error"):
        table.add_column(column, justify="left" if column == "network" else "right")
    for net in result["networks"]:
        table.add_row(
            net["name"],
            str(len(net["layer_std"])),
            f"{net['mean_std']:.3f}",
            f"{net['sorted_std'][0]:.3f}",
            f"{net['sorted_std'][-1]:.3f}",
            f"{net['final']['test_error']:.2%}",
        )
    console.print(table)
    for found in result["reading"]:
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in found.items() if isinstance(v, float))
        verdict = "holds" if found["holds"] else "does not hold"
        console.print(
            f"  {found['finding']}: {verdict} ({numbers})", highlight=False, soft_wrap=True
        )
    console.print(f"wrote {', '.join(map(str, paths))}")
    return 0
