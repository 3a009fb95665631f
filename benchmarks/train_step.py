"""Training throughput (images/s) of one model under each precision and memory layout.

    .venv/bin/python benchmarks/train_step.py --model resnet18 --width 0.5 --threads 1
    .venv/bin/python benchmarks/train_step.py --stem cifar --width 0.25 --widths 64,192,384,768

Times full SGD steps (forward, backward, update) on random single-channel batches (28x28, or
--size) after warm-up steps, and writes benchmarks/results/train_step-<time>.json with the
machine, whether the CPU has native bf16, and the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reslab.bench import machine_info
from reslab.engine.config import parse_widths
from reslab.errors import ReslabError
from reslab.models import create_model

RESULTS = Path(__file__).parent / "results"


def images_per_second(
    model_args: dict, precision: str, channels_last: bool, batch: int, size: int = 28
) -> float:
    model = create_model(**model_args)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):  # oneDNN builds its kernels on the first calls
        step()
    steps = 3
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--stem", default="small")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=28, help="image side (the seed preset: 96)")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--se", type=int, default=0, help="squeeze-and-excitation ratio; 0: off")
    parser.add_argument(
        "--widths",
        help="channels of each stage before --width multiplies them, e.g. 64,192,384,768",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_args = dict(
        name=args.model, stem=args.stem, width=args.width, in_channels=1, num_classes=10
    )
    if args.se:
        model_args["se"] = args.se
    if args.widths:
        try:
            model_args["widths"] = parse_widths(args.widths)
        except ReslabError as error:
            parser.error(str(error))
    load_before = os.getloadavg()
    rows = []
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            rate = images_per_second(
                model_args, precision, channels_last, args.batch_size, args.size
            )
            rows.append({"precision": precision, "channels_last": channels_last, "img_per_s": rate})
            print(f"{precision} channels_last={channels_last}: {rate:.0f} img/s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train_step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "machine": machine_info(),
        "model": model_args,
        "batch_size": args.batch_size,
        "image_size": args.size,
        "results": rows,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
