"""Every learning-rate schedule in reslab, as a factor on the base rate, and the hook that
applies one. Trainers name a schedule here; none defines its own."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from reslab.engine.loop import Hook, Loop


def onecycle(t: float, warmup: float) -> float:
    """Linear rise from 1/25 over the first ``warmup`` of the run, then cosine decay to zero
    (Smith & Topin 2017, "Super-Convergence"; torch's OneCycleLR without momentum cycling)."""
    if t < warmup:
        return 0.04 + 0.96 * t / warmup
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))


def cosine(t: float) -> float:
    """Cosine decay from 1 to 0 as ``t`` goes from 0 to 1 (Loshchilov & Hutter 2017)."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def step_decay(t: float) -> float:
    """x0.1 at 50% and 75% of the run (He et al. 2015, section 3.4)."""
    return 0.1 ** ((t >= 0.5) + (t >= 0.75))


def share_done(step: int, total: int, anchor: Sequence[float] = ()) -> float:
    """The share of a schedule over ``total`` steps done at ``step``: ``step / total``, or, once
    a re-plan has moved ``total`` at step s0 where the share done was t0 (``anchor`` (s0, t0)),
    t0 plus the rest spread evenly over the steps from s0, so that the rate does not jump."""
    if not anchor:
        return min(step / max(total, 1), 1.0)
    s0, t0 = anchor
    if total <= s0:  # the plan ends at the anchor: the schedule is done
        return 1.0
    return min(t0 + (1 - t0) * max(step - s0, 0) / (total - s0), 1.0)


def step_at(share: float, total: int, anchor: Sequence[float] = ()) -> int:
    """The first step at which :func:`share_done` reaches ``share``; with an ``anchor`` whose
    share is already past it, the anchor's step (the share was reached before it)."""
    if not anchor:
        return math.ceil(share * total)
    s0, t0 = anchor
    if share <= t0:
        return int(s0)
    return int(s0) + math.ceil((share - t0) / (1 - t0) * (total - s0))


def lr_factor(
    schedule: str, step: int, total: int, warmup: float, anchor: Sequence[float] = ()
) -> float:
    """The classifier's schedules by name, at optimizer step ``step`` of ``total`` (re-planned
    at ``anchor``, :func:`share_done`): ``onecycle``, ``cosine``, ``step`` or ``constant``."""
    t = share_done(step, total, anchor)
    if schedule == "onecycle":
        return onecycle(t, warmup)
    if schedule == "cosine":
        return cosine(t)
    if schedule == "step":
        return step_decay(t)
    return 1.0


def phased(
    schedule: str, step: int, first: int, total: int, warmup: float, anchor: Sequence[float] = ()
) -> float:
    """:func:`lr_factor` over the first ``first`` of ``total`` steps, then afresh over the rest:
    each phase of a fine-tuning run on a cycle of its own, as fastai's ``fine_tune`` calls
    ``fit_one_cycle`` once frozen and once unfrozen. ``first`` 0 is :func:`lr_factor`. The
    ``anchor`` (a global step, the share of the second cycle done then) bends the second."""
    if step < first:
        return lr_factor(schedule, step, first, warmup)
    return lr_factor(schedule, step - first, total - first, warmup, last_cycle(anchor, first))


def last_cycle(anchor: Sequence[float], first: int) -> tuple[float, ...]:
    """``anchor`` (a global step and a share) in the steps of the cycle that begins at
    ``first``."""
    return (anchor[0] - first, anchor[1]) if anchor else ()


def last_cycle_steps(config, n_steps: int) -> tuple[int, int, tuple[float, ...]]:
    """A training config's last cycle (after its ``freeze_epochs``) at ``n_steps`` an epoch:
    the step it begins at, its planned steps and ``config.schedule_anchor`` in its steps."""
    first = config.freeze_epochs * n_steps
    return first, config.epochs * n_steps - first, last_cycle(config.schedule_anchor, first)


def range_test(step: int, steps: int, start: float, end: float) -> float:
    """The learning-rate range test's rate at ``step`` of ``steps``: from ``start`` to ``end``
    evenly on a log scale (Smith 2017, "Cyclical Learning Rates", section 3.3; fastai's
    ``lr_find``)."""
    return start * (end / start) ** (step / max(steps - 1, 1))


def warmup_cosine(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up from 1/1000 over ``warmup`` steps (Goyal et al. 2017; detectron2), then
    cosine decay to zero as ``progress`` goes from 0 to 1.

    ``progress`` is the larger of the steps done and the time used, as shares of the plan, so
    that a run cut by a time budget still ends with its rate annealed.
    """
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    return cosine(progress)


def paper_steps(step: int, total: int) -> float:
    """The ResNet paper's CIFAR schedule (x0.1 at 32k and 48k of 64k iterations, section 4.2)
    scaled to ``total`` steps."""
    return 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))


class Schedule(Hook):
    """Before each step, every parameter group's rate is its base rate times
    ``factor(loop)``. The base rates are ``base`` for every group (one per group when a
    sequence), or else the groups' rates when the hook is made (before a resumed optimizer's
    state is loaded). A hook may set ``base`` to other rates between steps (a fine-tuning
    phase)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Callable[[Loop], float],
        base: float | Sequence[float] | None = None,
    ):
        self.optimizer, self.factor = optimizer, factor
        groups = optimizer.param_groups
        if isinstance(base, Sequence):
            self.base = list(base)
        else:
            self.base = [group["lr"] if base is None else base for group in groups]

    def rate(self, loop: Loop) -> float:
        """The first group's rate at the loop's next step."""
        return self.base[0] * self.factor(loop)

    def before_step(self, loop: Loop) -> None:
        factor = self.factor(loop)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * factor
