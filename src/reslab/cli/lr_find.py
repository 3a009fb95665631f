"""`reslab lr-find`: the learning-rate range test for any training config
(reslab.engine.lr_find)."""

from __future__ import annotations

import argparse

from reslab.cli.train import add_config_flags, config_from_args
from reslab.engine.lr_find import lr_find

OWN = ("steps", "start_lr", "end_lr")  # this command's flags, not the config's


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lr-find",
        help="learning-rate range test: the loss as the rate rises, and a suggested rate",
        description="Train the config's model from its start with the rate rising from "
        "--start-lr to --end-lr evenly on a log scale (Smith 2017; fastai's lr_find) until "
        "the loss diverges, then write lr_find.json and lr_find.png into the run folder and "
        "print a suggested --lr: a tenth of the rate at the lowest smoothed loss. Takes every "
        "`reslab train` flag; with --freeze-epochs it tests the frozen phase (the head alone).",
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="optimizer steps at most (default 100)"
    )
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first rate (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last rate (default 10)")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    own = {name: getattr(args, name) for name in OWN}
    for name in OWN:
        delattr(args, name)
    config, _, _ = config_from_args(args)
    lr_find(config, own["steps"], own["start_lr"], own["end_lr"])
    return 0
