"""`reslab runs [DIR]`: the runs in a folder as one table; `--diff A B`: what two differ in."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reslab.engine.runs import config_diff, find_runs
from reslab.precision import format_seconds


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "runs",
        help="list the runs in a folder, or the settings two runs differ in",
        description="One row per run folder (the folders with a config.json): when it started, "
        "model, preset, epochs finished of those planned, the last epoch's test accuracy, wall "
        "time and precision, newest first. Read from config.json and metrics.jsonl (a "
        "detector's log.jsonl) only.",
    )
    parser.add_argument(
        "folder",
        metavar="DIR",
        nargs="?",
        default="runs",
        help="a folder of run folders, or one run folder (default: %(default)s)",
    )
    parser.add_argument(
        "--diff",
        nargs=2,
        metavar=("A", "B"),
        help="instead of the table: the configuration keys whose values differ between run "
        "folders A and B (the output folder's own keys, out/force/resume, left out)",
    )
    parser.set_defaults(func=run)


def runs_table(folder: Path) -> tuple[Table, list[str]]:
    runs, notes = find_runs(folder)
    table = Table(title=f"runs in {folder}")
    for name, justify in (
        ("run", "left"),
        ("date", "left"),
        ("model", "left"),
        ("preset", "left"),
        ("epochs", "right"),
        ("acc %", "right"),
        ("time", "right"),
        ("precision", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name in ("date", "model", "acc %"))
    for r in runs:
        planned = f"/{r.planned}" if r.planned is not None else ""
        table.add_row(
            r.folder.name,
            r.date,
            r.model,
            r.preset,
            f"{r.epochs}{planned}",
            "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}",
            "-" if r.seconds is None else format_seconds(r.seconds),
            r.precision,
        )
    return table, notes


def diff_table(a: Path, b: Path) -> Table | None:
    rows = config_diff(a, b)
    if not rows:
        return None
    table = Table(title=f"configuration: {a} vs {b}")
    for name in ("key", str(a), str(b)):
        table.add_column(name)
    for key, left, right in rows:
        table.add_row(key, *("(absent)" if v is None else repr(v) for v in (left, right)))
    return table


def run(args: argparse.Namespace) -> int:
    # a table piped to a file or another program keeps its rows whole instead of wrapping them
    # at rich's default of 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if args.diff:
        a, b = (Path(p) for p in args.diff)
        table = diff_table(a, b)
        if table is None:
            print(f"{a} and {b} have the same configuration")
        else:
            console.print(table)
        return 0
    table, notes = runs_table(Path(args.folder))
    for note in notes:
        print(note, file=sys.stderr)
    console.print(table)
    return 0
