"""What TensorBoard logging costs a training run: the time spent inside its hook, as a share
of the same run's wall time.

    .venv/bin/python benchmarks/tensorboard_cost.py [--epochs 2] [--train-size 6000]

Trains the default preset, without its time budget, on the first --train-size training and
--test-size test images of Fashion-MNIST with the engine's ``fit`` and times every call of the run's
:class:`reslab.engine.tensorboard.TensorBoard` hook (opening and closing the writer, the
scalars and the first batch's images after each step, the epoch's scalars and confusion
figure), so the baseline is the run it is part of. Prints a table and writes
benchmarks/results/tensorboard-<time>.json with the machine and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reslab.bench import machine_info
from reslab.data import fashion_mnist
from reslab.engine import tensorboard
from reslab.engine.config import build_config
from reslab.engine.train import fit

RESULTS = Path(__file__).parent / "results"


class Timed:
    """Seconds spent in the hook's methods, by method."""

    def __init__(self):
        self.seconds = {"active": 0.0, "after_step": 0.0, "after_epoch": 0.0}
        self.calls = {name: 0 for name in self.seconds}

    def wrap(self, name: str, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed

    def wrap_active(self, method):
        @contextmanager
        def active(hook, loop):
            start = time.perf_counter()
            context = method(hook, loop)
            context.__enter__()
            self.seconds["active"] += time.perf_counter() - start
            try:
                yield
            finally:
                start = time.perf_counter()
                context.__exit__(None, None, None)
                self.seconds["active"] += time.perf_counter() - start

        return active


def subset(folder: Path, train: int, test: int) -> Path:
    """The first images of each Fashion-MNIST split as IDX files in ``folder``, which the run
    then reads instead of the installed set."""
    folder.mkdir(parents=True)
    for split, n in (("train", train), ("test", test)):
        whole = fashion_mnist.load(split)
        name = fashion_mnist.FILES[(split, "images")][0]
        fashion_mnist.write_idx(folder / f"{name}.gz", whole.images[:n])
        fashion_mnist.write_idx(
            folder / fashion_mnist.FILES[(split, "labels")][0], whole.labels[:n]
        )
    fashion_mnist.SYSTEM_DIR = folder / "installed-set-not-used"
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="(default %(default)s)")
    parser.add_argument("--train-size", type=int, default=6000, help="(default %(default)s)")
    parser.add_argument("--test-size", type=int, default=1000, help="(default %(default)s)")
    args = parser.parse_args()
    timed = Timed()
    hook = tensorboard.TensorBoard
    hook.after_step = timed.wrap("after_step", hook.after_step)
    hook.after_epoch = timed.wrap("after_epoch", hook.after_epoch)
    hook.active = timed.wrap_active(hook.active)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        data = subset(Path(folder) / "data", args.train_size, args.test_size)
        config = build_config(
            "default",
            epochs=args.epochs,
            max_minutes=0.0,
            data_dir=str(data),
            verify=False,
            out=str(Path(folder) / "run"),
        )
        start = time.perf_counter()
        result = fit(config, console=Console(quiet=True))
        run_seconds = time.perf_counter() - start
        event_bytes = sum(p.stat().st_size for p in result.run_dir.glob("events.out.*"))
    hook_seconds = sum(timed.seconds.values())
    record = {
        "machine": machine_info(),
        "preset": "default",
        "train_images": args.train_size,
        "test_images": args.test_size,
        "model": config.model,
        "model_kwargs": config.model_kwargs,
        "epochs": args.epochs,
        "batch_size": config.batch_size,
        "precision": config.precision,
        "steps": timed.calls["after_step"],
        "run_seconds": run_seconds,
        "hook_seconds": hook_seconds,
        "hook_share": hook_seconds / run_seconds,
        "seconds_by_method": timed.seconds,
        "calls_by_method": timed.calls,
        "event_file_bytes": event_bytes,
        "test_accuracy": result.test_accuracy,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    table = Table(title=f"TensorBoard hook in one {config.model} run, {args.epochs} epoch(s)")
    for name in ("run s", "hook s", "share %", "per step ms", "per epoch s", "events KiB"):
        table.add_column(name, justify="right")
    table.add_row(
        f"{run_seconds:.1f}",
        f"{hook_seconds:.2f}",
        f"{100 * record['hook_share']:.2f}",
        f"{1000 * timed.seconds['after_step'] / max(record['steps'], 1):.3f}",
        f"{timed.seconds['after_epoch'] / max(args.epochs, 1):.2f}",
        f"{event_bytes / 1024:.0f}",
    )
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"tensorboard-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
