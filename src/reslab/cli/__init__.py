"""The command line: the one place that reads arguments.

Each command lives in its own module with ``register(subparsers)``, which adds a parser whose
``func`` default takes the parsed arguments and returns an exit status.
"""

from __future__ import annotations

import argparse
import os
import sys

from reslab import __version__
from reslab.cli import (
    bench,
    detect,
    evaluate,
    explain,
    export,
    lr_find,
    models,
    predict,
    runs,
    scenes,
    serve,
    study,
    summary,
    train,
)
from reslab.errors import Interrupted, ReslabError

COMMANDS = (
    models,
    summary,
    train,
    lr_find,
    evaluate,
    predict,
    explain,
    runs,
    scenes,
    detect,
    study,
    bench,
    export,
    serve,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab",
        description="Residual networks on PyTorch: models as in the papers, training, "
        "detection, studies, benchmarks and export.",
    )
    parser.add_argument("--version", action="version", version=f"reslab {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # None: this process's own command line (`reslab train --processes`)
    # in a multi-process run, rank 0 alone reports; the others would repeat its words
    say = print if os.environ.get("RANK", "0") == "0" else lambda *a, **k: None
    try:
        return args.func(args) or 0
    except ReslabError as error:
        say(f"reslab: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        say(f"reslab: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        say("reslab: interrupted", file=sys.stderr)
        return 130
