"""How long the studies' default budgets take: an estimate from timed steps, not a full run.

    .venv/bin/python benchmarks/study_time.py [--steps 8] [--threads N]

Times ``--steps`` training steps of each network the default budgets train (the degradation
study's recipe, reslab.analysis.degradation.train_fixed_budget: batch 128, crop and flip,
channels_last) on real Fashion-MNIST batches, and the evaluation of 1,000 test images; then
multiplies out each study's default budget (steps per epoch, epochs, seeds, variants). Times
are the process's CPU seconds with one thread: on an idle core, its wall time. The
channels_last layout is timed against the contiguous one on ResNet-20 in the same run, as a
ratio (small stem). Writes benchmarks/results/study_time-<time>.json with the machine and the load
average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from reslab.analysis import responses, shortcuts
from reslab.analysis.degradation import (
    BUDGETS,
    DegradationConfig,
    budget_config,
    error_rate,
    normalize,
    train_fixed_budget,
)
from reslab.bench import machine_info
from reslab.data import fashion_mnist
from reslab.models import create_model

RESULTS = Path(__file__).parent / "results"


def seconds_per_step(name: str, config: DegradationConfig, x, y, steps: int, **kwargs) -> float:
    """Mean CPU seconds of this process per step over ``steps`` steps, after one untimed
    epoch of two steps (oneDNN builds its kernels on the first). CPU time, not wall time: on a
    machine shared with other jobs the wall time measures the other jobs; with one thread,
    the CPU time is what the step takes on an idle core."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10, **kwargs)
    tiny = (x[:8], y[:8])
    warm = replace(config, epochs=1)
    train_fixed_budget(model, (x[: 2 * config.batch_size], y[: 2 * config.batch_size]), tiny, warm)
    n = steps * config.batch_size
    started = time.process_time()
    train_fixed_budget(model, (x[:n], y[:n]), tiny, warm)
    return (time.process_time() - started - evaluated(model, tiny)) / steps


def evaluated(model, tiny) -> float:
    """CPU seconds of the per-epoch evaluation on ``tiny``, taken out of a step's time."""
    started = time.process_time()
    error_rate(model, *tiny)
    return time.process_time() - started


def seconds_per_1000_evaluated(name: str, x, stem: str) -> float:
    model = create_model(name, in_channels=1, num_classes=10, stem=stem)
    labels = torch.zeros(len(x), dtype=torch.long)
    error_rate(model, x[:100], labels[:100])
    started = time.process_time()
    error_rate(model, x[:1000], labels[:1000])
    return time.process_time() - started


def epoch_minutes(step: float, evaluate: float, config: DegradationConfig) -> float:
    steps = math.ceil(config.train_size / config.batch_size)
    return (steps * step + config.test_size / 1000 * evaluate) / 60


def study_budgets() -> dict[str, tuple[DegradationConfig, list[str], int]]:
    """Each study's default config, the networks it trains per depth, and how many times."""
    degradation = budget_config("default")
    variants = len(shortcuts.SHORTCUTS) + len(shortcuts.ORDERINGS) - 1  # identity == original
    return {
        "degradation": (degradation, ["plain_resnet", "resnet"], degradation.seeds),
        "shortcuts": (DegradationConfig(**shortcuts.DEFAULT), ["resnet"], variants),
        "responses": (DegradationConfig(**responses.DEFAULT), ["plain_resnet", "resnet"], 1),
    }


def needed() -> list[tuple[str, str]]:
    """(network, stem) pairs the default budgets train."""
    pairs = []
    for config, kinds, _ in study_budgets().values():
        for depth in config.depths:
            pairs += [(f"{kind}{depth}", config.stem) for kind in kinds]
    return list(dict.fromkeys(pairs))


def estimates(timed: dict) -> dict:
    """Minutes of each study's default budget from the timed step and evaluation costs."""
    minutes = {}
    for study, (config, kinds, times) in study_budgets().items():
        total = 0.0
        for depth in config.depths:
            for kind in kinds:
                t = timed[f"{kind}{depth} {config.stem}"]
                total += epoch_minutes(t["step"], t["eval_1000"], config) * config.epochs * times
        minutes[study] = total
    return minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps (default: 8)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU time per step is then an idle core's wall time
    load_start, machine = os.getloadavg(), machine_info()
    train = fashion_mnist.load("train")
    x, y = normalize(train.images[:4096]), train.labels[:4096]
    config = budget_config("default", precision="fp32")
    timed = {}
    for name, stem in needed():
        key = f"{name} {stem}"
        timed[key] = {
            "step": seconds_per_step(name, config, x, y, args.steps, stem=stem),
            "eval_1000": seconds_per_1000_evaluated(name, x, stem),
        }
        print(
            f"{key:<24} {timed[key]['step']:.3f} CPU s/step  "
            f"{timed[key]['eval_1000']:.2f} CPU s per 1,000 evaluated",
            flush=True,
        )
    contiguous = seconds_per_step(
        "resnet20", replace(config, channels_last=False), x, y, args.steps, stem="small"
    )
    ratio = contiguous / timed["resnet20 small"]["step"]
    print(f"resnet20 channels_last speedup over contiguous: {ratio:.2f}x")
    minutes = estimates(timed)
    for study, value in minutes.items():
        print(f"{study:<12} default budget: about {value:.0f} min (estimate)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"study_time-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "machine": {**machine, "load_average_end": os.getloadavg()},
        "load_average_start": load_start,
        "steps_timed": args.steps,
        "recipe": {**config.__dict__, "depths": list(config.depths)},
        "budgets": {
            k: {**v, "depths": list(v.get("depths", (20, 56)))} for k, v in BUDGETS.items()
        },
        "seconds": timed,
        "channels_last_speedup_resnet20": ratio,
        "threads": 1,
        "clock": "process CPU time",
        "estimated_minutes": minutes,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
