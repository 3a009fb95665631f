"""The one wall-clock budget of a run, ``--max-minutes``, and its two policies.

- **Plan** (classification): probe an epoch's time before training, fit the number of epochs
  to the budget, and plan again after each epoch (:mod:`reslab.engine.plan`); the schedule
  then spans exactly the planned steps.
- **Deadline** (the detector, box pretraining, the rescorer): train until the budget is spent,
  the schedule annealing over the larger of the steps done and the time used
  (:class:`StopAtDeadline` and :meth:`Budget.used`).

Both read one clock, :func:`now`, that a test may replace.
"""

from __future__ import annotations

import math
import time

from reslab.engine.distributed import any_rank
from reslab.engine.loop import Hook, Loop


def now() -> float:
    """The clock every budget is kept by (a test may replace it with its own)."""
    return time.perf_counter()


class Budget:
    """``minutes`` of wall time from ``started`` (default: now); 0 minutes: no limit.

    ``share`` of it may be planned for: the rest absorbs an estimate's error and the work
    after the last epoch.
    """

    def __init__(self, minutes: float, share: float = 1.0, started: float | None = None):
        self.minutes, self.share = minutes, share
        self.started = now() if started is None else started

    @property
    def limited(self) -> bool:
        return self.minutes > 0

    def elapsed(self) -> float:
        return now() - self.started

    def left(self, reserve: float = 0.0, elapsed: float | None = None) -> float:
        """Seconds that may still be planned for after ``elapsed`` (default: now), with
        ``reserve`` seconds set aside."""
        elapsed = self.elapsed() if elapsed is None else elapsed
        return self.minutes * 60 * self.share - elapsed - reserve

    def used(self) -> float:
        """The share of the whole budget spent (0 without a limit)."""
        return self.elapsed() / (60 * self.minutes) if self.limited else 0.0

    def spent(self) -> bool:
        return self.limited and self.used() >= 1


def epochs_within(seconds: float, epoch_seconds: float, most: int) -> int:
    """How many epochs of ``epoch_seconds`` fit in ``seconds``, at most ``most`` (may be 0)."""
    return max(0, min(most, math.floor(seconds / epoch_seconds)))


class StopAtDeadline(Hook):
    """Before each step: when the budget is spent on any process, stop before taking it, so
    that every process stops at the same step."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def before_step(self, loop: Loop) -> None:
        if self.budget.limited and any_rank(loop.world, self.budget.spent())[0]:
            loop.stop = True
