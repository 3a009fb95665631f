"""`reslab bench`: torchvision vs reslab's default and fast paths vs onnxruntime, side by side."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reslab.bench import BenchConfig, run_bench
from reslab.cli.predict import add_precision_flag
from reslab.cli.summary import parse_shape
from reslab.engine.checkpoint import atomic_write

RESULTS_DIR = Path("benchmarks/results")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="training and inference speed: torchvision, reslab default, reslab fast, ONNX",
        description="Measure, in one process and in alternating rounds, training img/s and "
        "inference (batch-1 latency, batch throughput) of (a) torchvision's model of the same "
        "architecture in eager fp32, (b) reslab's default path, (c) reslab's fast path "
        "(channels_last, folded batch norm, --precision; on a CPU with native bf16 an fp32 "
        "fast path is timed in bf16 too) and (d) the ONNX file in onnxruntime. Prints "
        "medians, ratios to (a) and GFLOP/s against a matmul measured in the same run; writes "
        "JSON.",
    )
    parser.add_argument("--model", default="resnet18", help="resnet18/34/50/101/152")
    parser.add_argument(
        "--input",
        default=(1, 28, 28),
        type=parse_shape,
        help="C,H,W (default 1,28,28: 1-channel 28x28 uses the Fashion-MNIST setup, 10 classes)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="training and throughput batch")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    add_precision_flag(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime row")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    parser.set_defaults(func=run)


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else ""


def print_table(console: Console, result: dict) -> None:
    cfg = result["config"]
    shape = "x".join(map(str, cfg["input_shape"]))
    matmul = ", ".join(f"{p} {m['median']:.0f}" for p, m in result["matmul_gflop_s"].items())
    table = Table(
        title=f"{cfg['model']} at {shape}, batch {cfg['batch_size']}, "
        f"median of {cfg['rounds']} rounds; matmul GFLOP/s: {matmul}"
    )
    columns = (
        "variant",
        "precision, layout",
        "train img/s",
        "vs (a)",
        "train GFLOP/s (% matmul)",
        f"infer img/s (b={cfg['batch_size']})",
        "vs (a)",
        "infer GFLOP/s (% matmul)",
        "latency b=1 ms",
        "vs (a)",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column.startswith(("variant", "prec")) else "right"
        )
    for row in result["variants"].values():
        train = (
            (
                f"{row['train_img_s']:.1f}",
                _ratio(row, "train_ratio"),
                f"{row['train_gflop_s']:.1f} ({row['train_fraction_of_matmul']:.0%})",
            )
            if "train_img_s" in row
            else ("", "", "")
        )
        table.add_row(
            row["label"],
            f"{row['precision']}, {row['layout']}",
            *train,
            f"{row['infer_img_s']:.1f}",
            _ratio(row, "infer_ratio"),
            f"{row['infer_gflop_s']:.1f} ({row['infer_fraction_of_matmul']:.0%})",
            f"{row['latency_ms']:.2f}",
            f"{row['latency_speedup']:.2f}x",
        )
    console.print(table)
    machine = result["machine"]
    console.print(
        f"{machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"native bf16: {machine['bf16_native']}; load average at start "
        f"{machine['load_average_start'][0]:.1f}, at end {machine['load_average_end'][0]:.1f} "
        "(a shared machine: compare ratios within a run)"
    )
    if result["onnx_check"] is not None:
        check = result["onnx_check"]
        console.print(
            f"ONNX vs torch: max |diff| {check['max_abs_diff']:.2e}, "
            f"largest |output| {check['max_abs_output']:.3g}"
        )


def run(args) -> int:
    # a wide table: when the output is a file or pipe, rich would otherwise wrap it at 80
    console = Console() if sys.stdout.isatty() else Console(width=160)
    cfg = BenchConfig(
        model=args.model,
        input_shape=args.input,
        batch_size=args.batch_size,
        rounds=args.rounds,
        warmup=args.warmup,
        compile=args.compile,
        precision=args.precision,
        onnx=not args.no_onnx,
    )
    with console.status("benchmarking") as status:
        result = run_bench(cfg, progress=status.update)
    print_table(console, result)
    shape = "x".join(map(str, args.input))
    out = (
        args.out
        or RESULTS_DIR / f"bench-{args.model}-{shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    console.print(f"wrote {out}")
    return 0
