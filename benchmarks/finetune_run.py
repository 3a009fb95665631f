"""The whole fine-tuning command, timed: `reslab train --weights W --preset finetune` on a
folder of 1,000 photos.

    .venv/bin/python benchmarks/finetune_run.py                      # 1,000 photos, resnet50
    .venv/bin/python benchmarks/finetune_run.py --images 200 --model resnet18

Writes ``--images`` JPEG photos (500x375, in 10 classes, a tenth more held out in val/) and a
torchvision ResNet state dict with random weights (no weights can be downloaded here; the
time does not depend on their values) to a temporary folder, then runs the command as a user
would, through ``python -m reslab``, and times it end to end: process start, reading the
weights, the folder, both phases, every evaluation, and the run folder's files.

Writes benchmarks/results/finetune_run-<time>.json with the wall time, the run's own epoch
records, the machine and the load average at the start and end (the machine may be shared),
and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from finetune_speed import write_photos
from reslab.bench import machine_info

RESULTS = Path(__file__).parent / "results"
CLASSES = 10


def write_folder(root: Path, images: int) -> None:
    for c in range(CLASSES):
        for split, count in (("train", images // CLASSES), ("val", images // CLASSES // 10)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for path in write_photos(folder, count, seed=c + (100 if split == "val" else 0)):
                path.rename(path.with_name(f"{c}-{path.name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="training photos")
    parser.add_argument("--model", default="resnet50", help="a torchvision ResNet name")
    parser.add_argument("flags", nargs="*", help="more `reslab train` flags, after --")
    args = parser.parse_args()
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root / "photos", args.images)
        weights = root / f"{args.model}.pth"
        torch.save(getattr(torchvision.models, args.model)().state_dict(), weights)
        command = [
            sys.executable, "-m", "reslab", "train", "--data", str(root / "photos"),
            "--weights", str(weights), "--preset", "finetune", "--model", args.model,
            "--out", str(root / "run"), *args.flags,
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"the run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        metrics = root / "run" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        config = json.loads((root / "run" / "config.json").read_text())
    result = {
        "task": "finetune_run",
        "command": ["reslab", *command[3:]],
        "images": args.images,
        "model": args.model,
        "seconds": seconds,
        "epochs": records,
        "config": config,
        "machine": machine,
        "load_average_end": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"finetune_run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in records:
        print(f"epoch {r['epoch']}: {r['img_per_s']:.1f} img/s, elapsed {r['elapsed_s']:.0f} s")
    print(f"whole command: {seconds:.0f} s on {args.images} photos ({args.model}, finetune)")
    print(f"load average {machine['load_average_start']} -> {result['load_average_end']}; {out}")


if __name__ == "__main__":
    main()
