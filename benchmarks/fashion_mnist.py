"""Fashion-MNIST accuracy and time of the training presets, through the `reslab train` command.

    .venv/bin/python benchmarks/fashion_mnist.py --presets default seed best
    .venv/bin/python benchmarks/fashion_mnist.py --presets speedrun --seeds 5

Each preset runs as `python -m reslab train --preset P --out runs/bench-P-...` (so with its own
process count, as a user gets it), timed from start to exit, and is scored on the full
10,000-image test set. Prints a table and writes benchmarks/results/fashion_mnist-<time>.json
with the machine (cores, CPU model, torch version) and the load average before and after,
because the machine may be shared. A run stopped by Ctrl-C or SIGTERM is kept as a partial
record of its finished epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from reslab.bench import machine_info
from reslab.engine.config import PRESETS, add_set_argument, parse_overrides, train_flags
from reslab.engine.target import target_reached
from reslab.errors import ReslabError

RESULTS = Path(__file__).parent / "results"


def run_preset(preset: str, overrides: dict, out: Path) -> tuple[int, float, str]:
    """Run `reslab train`; (exit status, wall seconds, its data line). Output passes through."""
    command = [sys.executable, "-m", "reslab", "train", "--preset", preset, "--out", str(out)]
    command += train_flags(overrides)
    print(" ".join(command[1:]), flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    # Ctrl-C reaches the child from the terminal; a SIGTERM sent to this script is passed on
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    data = ""
    try:
        for line in child.stdout:
            print(line, end="", flush=True)
            if line.startswith("data: "):
                data = line.removeprefix("data: ").strip()
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                continue  # the child saves and exits; wait for it
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, time.perf_counter() - started, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["default"], choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, help="override every preset's epochs")
    parser.add_argument("--model", help="override every preset's model")
    parser.add_argument("--threads", type=int, help="CPU threads per process")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run each preset with seeds 0..N-1 and record the mean and spread (default 1)",
    )
    add_set_argument(parser, "erasing=0 width=0.5 stem=cifar")
    parser.add_argument("--note", default="", help="free text saved with the results")
    args = parser.parse_args()

    overrides = {
        key: getattr(args, key) for key in ("epochs", "model", "threads") if getattr(args, key)
    }
    try:
        overrides.update(parse_overrides(args.set))
    except ReslabError as error:
        parser.error(str(error))

    if args.threads:
        # the machine record's torch_threads is read in this process: make it the runs' count
        torch.set_num_threads(args.threads)
    console = Console()
    rows = []
    if args.seeds < 1:
        parser.error(f"--seeds must be 1 or more, got {args.seeds}")
    if args.seeds > 1 and "seed" in overrides:
        parser.error("--seeds runs seeds 0..N-1; give it or --set seed=N, not both")
    runs = [(preset, seed) for preset in args.presets for seed in range(args.seeds)]
    for preset, seed in runs:
        # the process id keeps two runs started in the same second apart
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        out = Path(f"runs/bench-{preset}-{stamp}")
        load_before = os.getloadavg()
        given = overrides if args.seeds == 1 else {**overrides, "seed": seed}
        code, seconds, data = run_preset(preset, given, out)
        row = result_row(preset, out, code, seconds, data, load_before)
        rows.append(row)
        if "stopped" in row:
            console.print(f"stopped: {row['stopped']}")
            break

    write_results(console, rows, args.note)


def seed_summary(rows: list[dict]) -> dict:
    """Per preset with more than one finished run: the runs' mean test accuracy, its sample
    standard deviation and range, how many reached 94% and their mean seconds to it."""
    summary = {}
    for preset in dict.fromkeys(row["preset"] for row in rows):
        done = [r for r in rows if r["preset"] == preset and "stopped" not in r]
        if len(done) < 2:
            continue
        accuracy = [r["test_accuracy"] for r in done]
        reached = [r["seconds_to_94"] for r in done if r["seconds_to_94"] is not None]
        summary[preset] = {
            "seeds": [r["config"].get("seed") for r in done],
            "mean_accuracy": statistics.mean(accuracy),
            "std_accuracy": statistics.stdev(accuracy),
            "min_accuracy": min(accuracy),
            "max_accuracy": max(accuracy),
            "mean_seconds": statistics.mean(r["seconds"] for r in done),
            "max_seconds": max(r["seconds"] for r in done),
            "reached_94": len(reached),
            "mean_seconds_to_94": statistics.mean(reached) if reached else None,
        }
    return summary


def result_row(preset: str, out: Path, code: int, seconds: float, data: str, load_before) -> dict:
    """The record of one run, from its config.json and metrics.jsonl; a run that exited early
    (stopped, or failed) is marked with how, and scored by the epochs it finished."""
    config = (
        json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    )
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    history = [json.loads(line) for line in lines if line.strip()]
    last = history[-1] if history else {}
    first94 = target_reached(94, history)
    row = {
        "preset": preset,
        "config": config,
        "exit_status": code,
        "test_accuracy": last.get("test_acc", float("nan")),  # after the last finished epoch
        "best_epoch_accuracy": max((r["test_acc"] for r in history), default=float("nan")),
        "seconds": seconds,  # the whole command, start to exit
        # the first epoch at or above 94%, by the rule `reslab train --target 94` prints
        "seconds_to_94": (first94 or {}).get("elapsed_s"),
        "epoch_to_94": (first94 or {}).get("epoch"),
        "step_to_94": (first94 or {}).get("step"),
        "train_img_per_s": sum(r["img_per_s"] for r in history) / max(len(history), 1),
        "data": data,
        "run_dir": str(out),
        "history": history,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    if code != 0 or len(history) < config.get("epochs", 0):
        row["stopped"] = f"exit status {code} after {len(history)} epochs"
        row["completed_epochs"] = len(history)
    return row


def write_results(console: Console, rows: list[dict], note: str) -> None:
    info = machine_info()
    title = f"Fashion-MNIST, {info['cpu_model']}, {info['cores']} cores"
    if any(row["config"].get("device", "cpu") != "cpu" for row in rows):
        title += f", trained on {info['gpu']}"
    table = Table(title=title)
    for column in ("preset", "model", "epochs", "test acc %", "time", "to 94%", "img/s", "load"):
        table.add_column(column, justify="left" if column in ("preset", "model") else "right")
    for row in rows:
        to94 = row["seconds_to_94"]
        table.add_row(
            row["preset"],
            f"{row['config'].get('model', '?')} {row['config'].get('model_kwargs', '')}",
            str(row["config"].get("epochs", "?"))
            + (f" (stopped after {row['completed_epochs']})" if "stopped" in row else ""),
            f"{100 * row['test_accuracy']:.2f}",
            f"{row['seconds'] / 60:.1f} min",
            "-" if to94 is None else f"{to94 / 60:.1f} min",
            f"{row['train_img_per_s']:.0f}",
            f"{row['load_average_before'][0]:.1f}->{row['load_average_after'][0]:.1f}",
        )
    console.print(table)
    summary = seed_summary(rows)
    for preset, seeds in summary.items():
        console.print(
            f"{preset}: {100 * seeds['mean_accuracy']:.2f}% mean over {len(seeds['seeds'])} seeds "
            f"(std {100 * seeds['std_accuracy']:.2f}, {100 * seeds['min_accuracy']:.2f}-"
            f"{100 * seeds['max_accuracy']:.2f}), at most {seeds['max_seconds'] / 60:.1f} min, "
            f"{seeds['reached_94']} reached 94%"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    # the process id keeps results of runs that end in the same second apart
    path = RESULTS / f"fashion_mnist-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    path.write_text(
        json.dumps({"machine": info, "note": note, "runs": rows, "seeds": summary}, indent=1) + "\n"
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
