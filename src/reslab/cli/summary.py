"""`reslab summary NAME`: a stage table in the manner of the paper's Table 1."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from reslab.analysis.summary import (
    PAPER_GMACS,
    block_arithmetic,
    paper_comparison,
    summarize_name,
)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected C,H,W with three positive integers, got {text!r}"
        )
    return shape


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="stage table: output shapes, blocks, parameters, multiply-adds",
        description="Print each stage's output shape, number of blocks, parameters and "
        "multiply-adds (counted by torch.utils.flop_counter), then totals; for the ImageNet "
        "depths at 224x224, compare with the paper's Table 1.",
    )
    parser.add_argument(
        "name", nargs="?", default="resnet50", help="model name (default: resnet50)"
    )
    parser.add_argument(
        "--input", default="3,224,224", type=parse_shape, help="C,H,W (default 3,224,224)"
    )
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs")
    parser.add_argument("--stem", default=None, help="imagenet, cifar or small")
    parser.add_argument(
        "--v1", action="store_true", help="stride on the bottleneck's first 1x1 (original paper)"
    )
    parser.add_argument(
        "--compare",
        metavar="KINDS",
        help="instead of a model, compare blocks per block, e.g. basic,bottleneck",
    )
    parser.add_argument("--channels", type=int, default=256, help="block width for --compare")
    parser.set_defaults(func=run)


def print_block_comparison(console: Console, kinds: list[str], channels: int) -> list[dict]:
    results = [block_arithmetic(kind, channels) for kind in kinds]
    table = Table(title=f"one block, {channels} -> {channels} channels, 56x56")
    for column in ("block", "conv weights", "params (with BN)", "multiply-adds", "ratio"):
        table.add_column(column, justify="left" if column == "block" else "right")
    smallest = min(r["conv_weights"] for r in results)
    for r in results:
        table.add_row(
            r["kind"],
            f"{r['conv_weights']:,}",
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:,.1f} M",
            f"{r['conv_weights'] / smallest:.1f}x",
        )
    console.print(table)
    return results


def run(args) -> int:
    console = Console()
    if args.compare:
        print_block_comparison(console, args.compare.split(","), args.channels)
        return 0
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.stem:
        kwargs["stem"] = args.stem
    if args.v1:
        kwargs["stride_in_1x1"] = True
    summary = summarize_name(args.name, args.input, **kwargs)
    table = Table(title=f"{summary.name}, input {'x'.join(map(str, args.input))}")
    for column in ("stage", "output (C, H, W)", "blocks", "params", "multiply-adds"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in summary.rows:
        table.add_row(
            row.name,
            "x".join(map(str, row.output_shape)),
            str(row.blocks or ""),
            f"{row.params:,}",
            f"{row.macs / 1e6:,.1f} M",
        )
    table.add_row(
        "total", "", "", f"{summary.params:,}", f"{summary.macs / 1e9:.3f} G", style="bold"
    )
    console.print(table)
    depth = int(args.name.removeprefix("resnet")) if args.name.startswith("resnet") else None
    if depth in PAPER_GMACS and args.input == (3, 224, 224):
        c = paper_comparison(depth)
        console.print(
            f"paper (Table 1): {c['paper_macs'] / 1e9:.1f} G multiply-adds; this model with the "
            f"paper's v1 stride placement: {c['v1_macs'] / 1e9:.2f} G ({c['v1_vs_paper']:+.1%}); "
            f"default v1.5 placement (stride on the 3x3): {c['v1_5_macs'] / 1e9:.2f} G "
            f"({c['v1_5_cost']:+.1%} for better accuracy)"
        )
    return 0
