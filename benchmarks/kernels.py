"""What this CPU's kernels deliver: matrix products and res5's convolutions, fp32, bf16 and int8.

    .venv/bin/python benchmarks/kernels.py

The C4 detector's box head runs conv5_x on every RoI, so its speed is set by three convolution
shapes (a 1x1 reduce on 14x14, a 3x3 on 7x7, a 1x1 expand on 7x7). This times each at 200 RoIs
in fp32 and bf16 (oneDNN, channels_last) and in int8 (PyTorch's x86 quantized engine: uint8
activations, int8 per-channel weights), next to a 2048x2048 matrix product in each type, and
prints the rate in G(FL)OP/s. It says which precision can pay on this CPU before a whole
network is timed. Writes benchmarks/results/kernels-<time>.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

from reslab.bench import machine_info
from reslab.quantize import ENGINE

RESULTS = Path(__file__).parent / "results"

# (name, in channels, out channels, kernel, input side, stride): ResNet-101's res5 on RoIs
SHAPES = (
    ("res5 1x1 reduce, 14x14", 1024, 512, 1, 14, 1),
    ("res5 3x3, 7x7", 512, 512, 3, 7, 1),
    ("res5 1x1 expand, 7x7", 512, 2048, 1, 7, 1),
)


def rate(work: float, call: Callable[[], object], repeats: int) -> float:
    """Median G(FL)OP/s of ``call`` over ``repeats`` timed calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return work / statistics.median(times) / 1e9


def matmul_rates(size: int, repeats: int) -> dict[str, float]:
    work = 2 * size**3
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        rates[name] = rate(work, lambda a=a, b=b: a @ b, repeats)
    a = torch.randint(-64, 64, (size, size), dtype=torch.int8)
    b = torch.randint(-64, 64, (size, size), dtype=torch.int8)
    rates["int8"] = rate(work, lambda: torch._int_mm(a, b), repeats)
    return rates


def conv_rates(shape: tuple, rois: int, repeats: int) -> dict[str, float]:
    _, cin, cout, k, side, stride = shape
    out_side = side // stride
    work = 2 * rois * out_side * out_side * cout * cin * k * k
    x = torch.rand(rois, cin, side, side).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k) * (cin * k * k) ** -0.5
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xx = x.to(dtype)
        ww = w.to(dtype).contiguous(memory_format=torch.channels_last)
        rates[name] = rate(
            work,
            lambda xx=xx, ww=ww: F.conv2d(xx, ww, stride=stride, padding=k // 2),
            repeats,
        )
    conv = QuantizedConv2d(cin, cout, k, stride=stride, padding=k // 2)
    scales = w.abs().amax((1, 2, 3)) / 127
    weight = torch.quantize_per_channel(
        w, scales, torch.zeros(cout, dtype=torch.long), 0, torch.qint8
    )
    conv.set_weight_bias(weight, torch.zeros(cout))
    conv.scale, conv.zero_point = 0.05, 64
    qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
    rates["int8"] = rate(work, lambda: conv(qx), repeats)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rois", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048, help="matrix side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="free text saved with the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = ENGINE
    # quantized tensors are deprecated in favour of torchao; this measures them as they are
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")
    console = Console()
    info = machine_info()
    rows = {f"matmul {args.size}x{args.size}": matmul_rates(args.size, args.repeats)}
    for shape in SHAPES:
        rows[f"{shape[0]}, {shape[1]}->{shape[2]}"] = conv_rates(shape, args.rois, args.repeats)
    table = Table(title=f"G(FL)OP/s, {torch.get_num_threads()} threads, {args.rois} RoIs")
    for column in ("kernel", "fp32", "bf16", "int8", "int8 / fp32"):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for name, r in rows.items():
        table.add_row(
            name,
            *(f"{r[p]:.0f}" for p in ("fp32", "bf16", "int8")),
            f"{r['int8'] / r['fp32']:.1f}x",
        )
    console.print(table)
    result = {
        "kind": "kernels",
        "machine": info,
        "load_average_end": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "rois": args.rois,
        "quantized_engine": ENGINE,
        "gops": rows,
        "note": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
