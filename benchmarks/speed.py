"""`reslab bench` at its two default sizes, each in its own process.

ResNet-18 on 1x28x28 (the Fashion-MNIST setup) at batch 256, and ResNet-50 on 3x224x224 at
batch 8 (one batch-256 training step of ResNet-50 at 224x224 is 6.3 TFLOP). Results land in benchmarks/results/ with the machine's description; docs/speed.md shows
them. Run from the repository root:

    .venv/bin/python benchmarks/speed.py [--rounds 3]
"""

import argparse
import subprocess
import sys

RUNS = (
    ["--model", "resnet18", "--input", "1,28,28", "--batch-size", "256"],
    ["--model", "resnet50", "--input", "3,224,224", "--batch-size", "8"],
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="3")
    args = parser.parse_args()
    for run in RUNS:
        command = [sys.executable, "-m", "reslab", "bench", *run, "--rounds", args.rounds]
        status = subprocess.call(command)
        if status:
            sys.exit(status)
