"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3; fastai's ``lr_find``) for any training config, on the training
skeleton: the run's own step, with the rate rising from ``start`` to ``end`` evenly on a log
scale (:func:`reslab.engine.schedules.range_test`) until the loss diverges.

A config with ``freeze_epochs`` tests its first phase: the head alone, the body frozen.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from reslab.engine.checkpoint import atomic_write
from reslab.engine.config import TrainConfig
from reslab.engine.distributed import init_world
from reslab.engine.finetune import base_rates, set_frozen
from reslab.engine.loop import Hook, Loop, run
from reslab.engine.plan import plan_for_data
from reslab.engine.plots import pyplot
from reslab.engine.schedules import Schedule, range_test
from reslab.engine.state import (
    TrainState,
    build_state,
    epoch_generator,
    new_run_dir,
    prepare,
    say,
    steps_per_epoch,
)
from reslab.engine.train import ClassifyStep, epoch_batches
from reslab.errors import ReslabError

SMOOTHING = 0.98  # the losses' exponential average, debiased (fastai's)
DIVERGED = 4.0  # the test stops when the smoothed loss exceeds this many times its minimum
SETTLE_STEPS = 10  # steps before a divergence counts: the first losses are noise


@dataclass
class RangeTest:
    rates: list[float]  # each step's rate (the head's)
    losses: list[float]  # each step's loss
    smoothed: list[float]
    suggested: float  # a tenth of the rate at the lowest smoothed loss (fastai's lr_min)
    steepest: float  # the rate where the smoothed loss falls fastest per log-rate


class Record(Hook):
    """The model in training mode and the epoch's augmentation draws (the run's), each step's
    rate and loss, and the stop: after ``steps`` steps, or when the smoothed loss diverges."""

    def __init__(self, state: TrainState, steps: int):
        self.state, self.steps = state, steps
        self.rates, self.losses, self.smoothed = [], [], []
        self.average = 0.0

    def before_epoch(self, loop: Loop) -> None:
        config = self.state.config
        self.state.model.train()
        set_frozen(self.state.model, bool(config.freeze_epochs), config.train_bn)
        self.state.draws = epoch_generator(config.seed, loop.epoch + 1, 1)

    def before_step(self, loop: Loop) -> None:
        self.rates.append(max(g["lr"] for g in self.state.optimizer.param_groups))

    def after_step(self, loop: Loop) -> None:
        loss = loop.loss
        self.losses.append(loss)
        if not math.isfinite(loss):
            loop.stop = True
            return
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        smoothed = self.average / (1 - SMOOTHING ** len(self.losses))
        self.smoothed.append(smoothed)
        diverged = loop.step > SETTLE_STEPS and smoothed > DIVERGED * min(self.smoothed)
        loop.stop = diverged or loop.step >= self.steps


def suggestions(rates: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(a tenth of the rate at the lowest smoothed loss, the rate of the steepest fall of the
    smoothed loss against the log of the rate, before that lowest point)."""
    if len(smoothed) < 3:
        raise ReslabError(
            f"the range test ended after {len(smoothed)} step(s); give a lower --start-lr or "
            "more --steps"
        )
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    slopes = [
        (smoothed[i + 1] - smoothed[i]) / math.log(rates[i + 1] / rates[i])
        for i in range(max(lowest, 1))
    ]
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return rates[lowest] / 10, rates[steepest]


def lr_find(
    config: TrainConfig,
    steps: int = 100,
    start: float = 1e-7,
    end: float = 10.0,
    console: Console | None = None,
) -> tuple[RangeTest, Path]:
    """Run the range test for ``config`` and write ``lr_find.json`` and ``lr_find.png`` into
    its run folder; returns the test and the folder."""
    if not 0 < start < end or steps < 3:
        raise ReslabError(
            f"the range test needs 0 < --start-lr < --end-lr and --steps >= 3, got {start:g}, "
            f"{end:g} and {steps}"
        )
    console = console or Console()
    world = init_world()
    if config.precision == "auto":
        config.precision = "fp32"  # timing both precisions would cost more than the test
    source = prepare(config, world, console)
    plan_for_data(config, source, console)
    state = build_state(config, source, Path("."), console, pretrained=True)
    state.run_dir = run_dir = new_run_dir(config)
    state.loop.epochs = None  # until the recorder stops it
    # each group's rate relative to the head's, so that the test sweeps the head's rate and
    # discriminative rates keep their slice below it
    relative = [rate / config.lr for rate in base_rates(state)]
    schedule = Schedule(
        state.optimizer, lambda loop: range_test(loop.step, steps, start, end), relative
    )
    record = Record(state, steps)
    step = ClassifyStep(state, steps_per_epoch(config, source))
    run(state.loop, epoch_batches(state, source), step, [schedule, record])
    n = len(record.smoothed)
    suggested, steepest = suggestions(record.rates[:n], record.smoothed)
    test = RangeTest(record.rates, record.losses, record.smoothed, suggested, steepest)
    write(test, run_dir)
    say(
        console,
        f"suggested lr {suggested:.2g} (a tenth of the rate at the lowest loss); steepest fall "
        f"at {steepest:.2g}; {len(test.losses)} steps; plot {run_dir / 'lr_find.png'}",
    )
    return test, run_dir


def write(test: RangeTest, run_dir: Path) -> None:
    """lr_find.json and lr_find.png (loss against rate, log scale, the suggestions marked)."""
    text = json.dumps(asdict(test), indent=1) + "\n"
    atomic_write(run_dir / "lr_find.json", lambda f: f.write(text.encode()))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(test.rates[: len(test.smoothed)], test.smoothed, label="loss (smoothed)")
    for rate, name in ((test.suggested, "suggested"), (test.steepest, "steepest fall")):
        ax.axvline(rate, linestyle="--", alpha=0.6, label=f"{name} {rate:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="lr range test")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(run_dir / "lr_find.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
