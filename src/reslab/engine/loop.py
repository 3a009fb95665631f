"""The one training skeleton: a loop over steps that calls a step function and hooks.

Every trainer in reslab (classification, the detector, box pretraining, the rescorer, the
degradation study, the seed screen) is a :class:`Step` plus a list of hooks run by
:func:`run`; the learning-rate schedule, EMA, the time budget, checkpoints, evaluation,
progress, signals and the non-finite-loss stop are hooks (this module and
:mod:`reslab.engine.schedules`, :mod:`reslab.engine.ema`, :mod:`reslab.engine.budget`), in the
manner of detectron2's ``TrainerBase`` (``before_step`` / ``run_step`` / ``after_step``).

A step is two calls, so that a hook can look at the losses before they reach the weights:
``forward(batch)`` returns named losses (``"loss"`` the one to minimise), then
``update(losses)`` takes the optimizer step. The non-finite check runs between the two, so
the last checkpoint on disk is always made from finite weights.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from reslab.engine.distributed import World, any_rank
from reslab.errors import ReslabError


class Step(Protocol):
    def forward(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def update(self, losses: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Loop:
    """Where a run is: read and steered by hooks."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches taken in the current epoch
    epochs: int | None = None  # epochs planned (a hook may change it); None: until stopped
    stop: bool = False  # set by a hook: the run ends after the current step
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # the latest step's
    world: World = field(default_factory=World)
    extra: dict = field(default_factory=dict)  # a trainer's own running values

    @property
    def loss(self) -> float:
        return self.losses["loss"].item()


class Hook:
    """A part of a run that acts at fixed points of :func:`run`; the defaults do nothing."""

    def before_run(self, loop: Loop) -> None:
        pass

    def before_epoch(self, loop: Loop) -> None:
        pass

    def before_step(self, loop: Loop) -> None:
        pass

    def after_forward(self, loop: Loop, losses: dict[str, torch.Tensor]) -> None:
        pass

    def after_step(self, loop: Loop) -> None:
        pass

    def after_epoch(self, loop: Loop) -> None:
        pass

    def after_run(self, loop: Loop) -> None:
        pass

    @contextmanager
    def active(self, loop: Loop):
        """A context held for the whole run (signal handlers, progress bars)."""
        yield


def _each(hooks: Sequence[Hook], name: str, *args) -> None:
    for hook in hooks:
        getattr(hook, name)(*args)


def run(
    loop: Loop,
    batches: Callable[[Loop], Iterable],
    step: Step,
    hooks: Sequence[Hook] = (),
) -> Loop:
    """Run epochs of ``batches(loop)`` (an epoch's batches, given the loop's position) through
    ``step`` until ``loop.epochs`` are done or a hook sets ``loop.stop``.

    An epoch that a hook stops part-way is not counted as done: ``loop.epoch`` and
    ``loop.batch_in_epoch`` then say where a resumed run starts.
    """
    with ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook.active(loop))
        _each(hooks, "before_run", loop)
        while not loop.stop and (loop.epochs is None or loop.epoch < loop.epochs):
            _each(hooks, "before_epoch", loop)
            for batch in batches(loop):
                _each(hooks, "before_step", loop)
                if loop.stop:
                    break
                losses = step.forward(batch)
                _each(hooks, "after_forward", loop, losses)
                step.update(losses)
                loop.losses = losses
                loop.step += 1
                loop.batch_in_epoch += 1
                _each(hooks, "after_step", loop)
                if loop.stop:
                    break
            else:
                loop.epoch += 1
                loop.batch_in_epoch = 0
                _each(hooks, "after_epoch", loop)
                continue
            break
        _each(hooks, "after_run", loop)
    return loop


def skip(batches: Iterable, count: int) -> Iterable:
    """``batches`` without its first ``count``: a resumed epoch draws the same order and
    skips what the interrupted run already took."""
    for index, batch in enumerate(batches):
        if index >= count:
            yield batch


class NonFiniteLoss(ReslabError):
    """A loss became NaN or infinite; the run stopped before the update."""


class StopOnNonFinite(Hook):
    """Raise :class:`NonFiniteLoss` when any named loss is not finite on any process, before
    the optimizer moves the weights. ``message(loop, bad)`` words the error for its trainer."""

    def __init__(self, message: Callable[[Loop, dict[str, float]], str]):
        self.message = message

    def after_forward(self, loop: Loop, losses: dict[str, torch.Tensor]) -> None:
        values = {name: value.item() for name, value in losses.items()}
        bad = {name: v for name, v in values.items() if not math.isfinite(v)}
        if any_rank(loop.world, bool(bad))[0]:
            raise NonFiniteLoss(self.message(loop, bad or values))


class StopOnSignals(Hook):
    """SIGINT and SIGTERM mark the run; it finishes its step, every process stops at the same
    one, and later hooks (a checkpoint) see ``loop.stop`` with ``loop.extra['signal']``.

    The mark is read once a step, before its update (where the processes agree on it), and
    ends the run after that step: a signal that arrives later in a step ends the next one.
    """

    def __init__(self):
        self.caught = [0]
        self.pending = False

    @contextmanager
    def active(self, loop: Loop):
        with caught_signals() as self.caught:
            yield

    def after_forward(self, loop: Loop, losses: dict[str, torch.Tensor]) -> None:
        (self.pending,) = any_rank(loop.world, bool(self.caught[0]))

    def after_step(self, loop: Loop) -> None:
        if self.pending:
            loop.extra["signal"] = self.caught[0] or loop.extra.get("signal", 0)
            loop.stop = True


@contextmanager
def caught_signals():
    """SIGINT and SIGTERM recorded, not acted on, while the block runs (in the main thread,
    where Python delivers signals): yields a one-item list that holds the latest signal's
    number, 0 while none came. The previous handlers come back after the block."""
    if _CAUGHT:  # within an outer block: one record, so a signal before the loop counts
        yield _CAUGHT[-1]
        return
    caught = [0]
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum, frame):
        caught[0] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _CAUGHT.append(caught)
    try:
        yield caught
    finally:
        _CAUGHT.pop()
        for s, h in previous.items():
            signal.signal(s, h)


_CAUGHT: list[list[int]] = []  # the record of the outermost caught_signals block


class Every(Hook):
    """Call ``action(loop)`` after every ``steps``-th step (0: never) and, with ``epochs``,
    after every epoch."""

    def __init__(self, action: Callable[[Loop], None], steps: int = 0, epochs: bool = False):
        self.action, self.steps, self.epochs = action, steps, epochs

    def after_step(self, loop: Loop) -> None:
        if self.steps and loop.step % self.steps == 0:
            self.action(loop)

    def after_epoch(self, loop: Loop) -> None:
        if self.epochs:
            self.action(loop)
