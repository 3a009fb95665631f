"""`reslab models`: the registry, one line per model."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from reslab.models import create_model, list_models, model_defaults


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model zoo",
        description="List every registered model with its blocks, stem and parameter count "
        "(at the registry's default input channels and classes).",
    )
    parser.add_argument("--filter", default="", help="only names containing this text")
    parser.set_defaults(func=run)


def run(args) -> int:
    table = Table(title="reslab models")
    for column in ("name", "block", "blocks per stage", "stem", "shortcut", "params"):
        table.add_column(
            column, justify="right" if column == "params" else "left", no_wrap=column == "name"
        )
    for name in list_models():
        if args.filter not in name:
            continue
        spec = model_defaults(name)
        with torch.device("meta"):  # counts only: no memory, no initialisation
            params = sum(p.numel() for p in create_model(name).parameters())
        table.add_row(
            name,
            spec["block"],
            "-".join(map(str, spec["layers"])),
            spec["stem"],
            spec["shortcut"],
            f"{params:,}",
        )
    Console().print(table)
    return 0
