"""Fashion-MNIST accuracy and time of the training presets, through `reslab train`'s code path.

    .venv/bin/python benchmarks/fashion_mnist.py --presets default seed best

Each preset trains with `reslab.engine.train.fit` (what `reslab train --preset P` runs) and is
scored on the full 10,000-image test set. Prints a table and writes
benchmarks/results/fashion_mnist-<time>.json with the machine (cores, CPU model, torch
version) and the load average before and after, because the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reslab.bench import machine_info
from reslab.engine.config import PRESETS, build_config
from reslab.engine.train import fit
from reslab.errors import Interrupted

RESULTS = Path(__file__).parent / "results"


def time_to(history: list[dict], accuracy: float) -> float | None:
    """Seconds from the start of the run to the first epoch at or above ``accuracy``."""
    return next((r["elapsed_s"] for r in history if r["test_acc"] >= accuracy), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["default"], choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, help="override every preset's epochs")
    parser.add_argument("--model", help="override every preset's model")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=JSON",
        help="override any config field, e.g. --set erasing=0 model_kwargs='{\"width\": 0.5}'",
    )
    parser.add_argument("--note", default="", help="free text saved with the results")
    args = parser.parse_args()

    console = Console()
    rows = []
    for preset in args.presets:
        # the process id keeps two runs started in the same second apart
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        overrides = {"out": f"runs/bench-{preset}-{stamp}"}
        if args.epochs:
            overrides["epochs"] = args.epochs
        if args.model:
            overrides["model"] = args.model
        if args.threads:
            overrides["threads"] = args.threads
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key] = json.loads(value)
        config = build_config(preset, **overrides)
        load_before = os.getloadavg()
        try:
            result = fit(config, console=console)
        except Interrupted as stop:
            # Ctrl-C or SIGTERM: keep the epochs finished so far, marked as a partial run
            rows.append(partial_row(preset, config, stop, load_before))
            console.print(f"stopped: {stop}")
            break
        rows.append(
            {
                "preset": preset,
                "config": config.to_dict(),
                "test_accuracy": result.test_accuracy,
                "best_epoch_accuracy": result.best_accuracy,
                "seconds": result.seconds,
                "seconds_to_94": time_to(result.history, 0.94),
                "train_img_per_s": sum(r["img_per_s"] for r in result.history)
                / len(result.history),
                "test_images": int(result.evaluation.confusion.sum()),
                "data": result.source,
                "run_dir": str(result.run_dir),
                "history": result.history,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            }
        )

    write_results(console, rows, args.note)


def partial_row(preset: str, config, stop: Exception, load_before) -> dict:
    """The record of a run stopped before its last epoch, from its metrics.jsonl."""
    lines = (Path(config.out) / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines if line.strip()]
    last = history[-1] if history else {}
    return {
        "preset": preset,
        "config": config.to_dict(),
        "stopped": str(stop),
        "completed_epochs": len(history),
        "test_accuracy": last.get("test_acc", float("nan")),  # after the last finished epoch
        "best_epoch_accuracy": max((r["test_acc"] for r in history), default=float("nan")),
        "seconds": last.get("elapsed_s", float("nan")),
        "seconds_to_94": time_to(history, 0.94),
        "train_img_per_s": sum(r["img_per_s"] for r in history) / max(len(history), 1),
        "run_dir": str(config.out),
        "history": history,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def write_results(console: Console, rows: list[dict], note: str) -> None:
    info = machine_info()
    table = Table(title=f"Fashion-MNIST, {info['cpu_model']}, {info['cores']} cores")
    for column in ("preset", "model", "epochs", "test acc %", "time", "to 94%", "img/s", "load"):
        table.add_column(column, justify="left" if column in ("preset", "model") else "right")
    for row in rows:
        to94 = row["seconds_to_94"]
        table.add_row(
            row["preset"],
            f"{row['config']['model']} {row['config']['model_kwargs']}",
            str(row["config"]["epochs"])
            + (f" (stopped after {row['completed_epochs']})" if "stopped" in row else ""),
            f"{100 * row['test_accuracy']:.2f}",
            f"{row['seconds'] / 60:.1f} min",
            "-" if to94 is None else f"{to94 / 60:.1f} min",
            f"{row['train_img_per_s']:.0f}",
            f"{row['load_average_before'][0]:.1f}->{row['load_average_after'][0]:.1f}",
        )
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"fashion_mnist-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": info, "note": note, "runs": rows}, indent=1) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
