"""Classification's budget policy, probe and plan: time an epoch before the run, fit
``config.epochs`` to ``--max-minutes`` (:class:`reslab.engine.budget.Budget`), plan again after
each epoch, and resolve ``--precision auto`` from the same timings."""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from reslab.data.sources import Source
from reslab.engine.batches import batch_loss, sam_steps
from reslab.engine.budget import Budget, epochs_within
from reslab.engine.config import PRESETS, TrainConfig
from reslab.engine.distributed import World, any_rank, sum_over_ranks, wrap
from reslab.engine.evaluate import logits
from reslab.engine.loop import Hook, Loop
from reslab.engine.schedules import last_cycle_steps, share_done
from reslab.engine.state import TrainState, build_state, epoch_generator, say, steps_per_epoch
from reslab.errors import ReslabError
from reslab.precision import format_seconds, resolve_precision

# Steps timed (after WARMUP_STEPS untimed ones, which pay for oneDNN's kernel setup and the
# allocator's growth) to estimate an epoch, and the share of the budget that the planned
# epochs may fill: the rest absorbs the estimate's error, the final plots and the process start.
# The warm-up and the timing each end early, after at least MIN_PROBE_STEPS steps, once they
# have taken PROBE_SECONDS: a ResNet-50 step at 224 px takes seconds on a small CPU, and
# --precision auto probes six times.
TIMED_STEPS = 12
WARMUP_STEPS = 6
MIN_PROBE_STEPS = 2
PROBE_SECONDS = 5.0
BUDGET_SHARE = 0.97
# The plan is made again after each epoch but the last, from the median of the latest
# RECENT_EPOCHS epoch times (the probe's estimate standing in for epochs not yet run): a median,
# so that one epoch slowed by other work on the machine does not cut the plan; the latest, so
# that the plan follows a machine that runs lastingly faster or slower. Within the one-cycle
# rise a re-plan re-indexes the schedule to the new length; after it, the schedule spreads its
# remaining course over the new plan from the step of the change (config.schedule_anchor), so
# that no re-plan jumps the rate in its decay.
RECENT_EPOCHS = 3
# A folder run without a preset sizes the values not given to the folder (config.plan_data):
# the batch halves from the preset's, down to SMALLEST_BATCH, until an epoch has at least
# MIN_EPOCH_STEPS steps; the rate follows the batch (the linear scaling rule, Goyal et al.
# 2017, section 2.1); the epochs rise until the run takes at least PLANNED_STEPS steps. A
# folder the size of Fashion-MNIST keeps the preset's recipe.
SMALLEST_BATCH = 16
MIN_EPOCH_STEPS = 32
PLANNED_STEPS = 1000


@contextmanager
def throwaway_state(config: TrainConfig, source: Source, world: World):
    """A fresh training state of ``config`` for timing probes, built and used with the global
    random state forked, so that the run itself draws as if no probe had run."""
    devices = [] if config.device == "cpu" else [config.device]
    with torch.random.fork_rng(devices=devices):
        probe = build_state(config, source, Path("."))
        probe.world = world
        yield probe


def seconds_per_epoch(config: TrainConfig, source: Source, world: World) -> float:
    """Estimated wall seconds of one epoch of ``config`` on this machine: training, timed over
    a few steps of a throwaway model on real batches, plus the evaluation after it, timed on
    one test batch and scaled. The global random state is left as it was."""
    with throwaway_state(config, source, world) as probe:
        model = wrap(probe.model, world, config.sync_bn)
        probe.draws = epoch_generator(config.seed, 0, 1)
        batches = itertools.chain.from_iterable(
            source.train_batches(config.batch_size, epoch_generator(config.seed, e, 0))
            for e in itertools.count()
        )

        def step() -> None:
            images, labels = next(batches)
            _, _, loss = batch_loss(probe, model, images, labels)
            probe.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            probe.optimizer.step()
            if probe.ema is not None:
                probe.ema.update_parameters(probe.model)
            loss.item()  # waits for a GPU to finish the step

        probe_steps(step, WARMUP_STEPS, world)
        taken, seconds = probe_steps(step, TIMED_STEPS, world)
        train = seconds / taken * steps_per_epoch(config, source)
        return train + evaluation_seconds(probe, source)


def probe_steps(step, most: int, world: World) -> tuple[int, float]:
    """Call ``step`` up to ``most`` times, ending early once at least ``MIN_PROBE_STEPS`` calls
    have taken ``PROBE_SECONDS`` on any process (so that all take the same steps); the calls
    made and their seconds."""
    started = time.perf_counter()
    for taken in range(1, most + 1):
        step()
        seconds = time.perf_counter() - started
        if any_rank(world, taken >= MIN_PROBE_STEPS and seconds >= PROBE_SECONDS)[0]:
            break
    return taken, seconds


def evaluation_seconds(state: TrainState, source: Source, shift: int = 0) -> float:
    """Estimated wall seconds of evaluating ``state``'s model on the whole test set with
    ``shift`` views (:func:`reslab.engine.evaluate.views`), timed on one test batch after an
    untimed one and scaled."""
    config = state.config
    images, _ = next(iter(source.test_batches(config.eval_batch_size)))
    test = functools.partial(
        logits,
        state.eval_model,
        images,
        state.spec,
        config.precision,
        config.channels_last,
        config.tta,
        shift,
    )
    test()
    started = time.perf_counter()
    test()
    return (time.perf_counter() - started) * math.ceil(source.test_size / len(images))


def last_evaluation_extra(config: TrainConfig, source: Source, world: World) -> float:
    """Estimated seconds the last epoch's evaluation takes beyond the others': the
    ``--tta-shift`` views are only scored then. 0 without them. The random state is kept."""
    if not config.tta_shift:
        return 0.0
    with throwaway_state(config, source, world) as probe:
        extra = evaluation_seconds(probe, source, config.tta_shift) - evaluation_seconds(
            probe, source
        )
    (total,) = sum_over_ranks(world, torch.tensor(max(extra, 0.0), dtype=torch.float64))
    return total.item() / world.size


def planned_epochs(
    config: TrainConfig, n_steps: int, seconds: float, epoch_seconds: float, done: int, most: int
) -> int:
    """The most epochs in all, from ``done`` up to ``most``, whose epochs after ``done`` fit in
    ``seconds``: each takes ``epoch_seconds`` without SAM, and each step that takes SAM's
    second pass (:func:`~reslab.engine.batches.sam_begins`, which moves with the plan) costs a
    step more."""
    total = done + epochs_within(seconds, epoch_seconds, most - done)
    while total > done:
        planned = replace(config, epochs=total)
        extra = sam_steps(planned, n_steps, done * n_steps, total * n_steps) / n_steps
        if (total - done + extra) * epoch_seconds <= seconds:
            break
        total -= 1
    return total


def shared_epoch_estimate(config: TrainConfig, source: Source, world: World) -> float:
    """:func:`seconds_per_epoch` averaged over the processes, so that every process plans the
    same: the same precision, the same number of epochs."""
    estimate = seconds_per_epoch(config, source, world)
    (total,) = sum_over_ranks(world, torch.tensor(estimate, dtype=torch.float64))
    return total.item() / world.size


def choose_precision(
    config: TrainConfig, source: Source, world: World, console: Console
) -> float | None:
    """Resolve ``config.precision == "auto"`` for this machine by the one rule of
    :func:`reslab.precision.resolve_precision`, an epoch (:func:`shared_epoch_estimate`) being
    what it times. Returns the chosen precision's epoch estimate, None when nothing was timed.
    """

    def measure(precision: str) -> float:
        config.precision = precision
        return shared_epoch_estimate(config, source, world)

    config.precision, estimate = resolve_precision(
        "auto", config.device, measure, lambda line: say(console, line), "an epoch"
    )
    return estimate


def fit_to_budget(
    config: TrainConfig,
    source: Source,
    world: World,
    budget: Budget,
    console: Console,
    estimate: float | None = None,
    reserve: float = 0.0,
) -> float:
    """Lower ``config.epochs`` to what fits in ``budget``, less ``reserve`` seconds;
    ``estimate``: an epoch's seconds if already measured (:func:`shared_epoch_estimate`).
    Returns the estimate the plan used."""
    if estimate is None:
        estimate = shared_epoch_estimate(config, source, world)
    n_steps = steps_per_epoch(config, source)
    epochs = planned_epochs(config, n_steps, budget.left(reserve), estimate, 0, config.epochs)
    if epochs == 0:
        raise ReslabError(
            f"--max-minutes {config.max_minutes:g}: one epoch takes about "
            f"{format_seconds(estimate)} on this machine (measured), more than the budget leaves "
            "for training; give a larger --max-minutes, or a smaller --width or --batch-size"
        )
    sam = ""
    if config.sam:
        share = sam_steps(replace(config, epochs=epochs), n_steps, 0, epochs * n_steps)
        sam = f", {share / n_steps:.1f} more for SAM's second passes"
    say(
        console,
        f"time budget {config.max_minutes:g} min: one epoch takes about {format_seconds(estimate)} "
        f"here (measured), so {epochs} of {config.epochs} epochs{sam}",
    )
    config.epochs = epochs
    return estimate


class Replan(Hook):
    """After each epoch but the last, plan ``config.epochs`` again from the time left and the
    median of the latest ``RECENT_EPOCHS`` of ``estimate`` (the probe's seconds an epoch) and
    the epochs' measured seconds (training and evaluation): at most ``requested``, at least the
    epochs done. The schedule reads ``config.epochs`` and ``config.schedule_anchor`` at every
    step, and a change sets the anchor (:func:`schedule_anchor`); SAM's second passes count as
    steps of ``n_steps`` an epoch (:func:`planned_epochs`).
    ``changed(loop)`` runs when the plan moves.

    Placed after the epoch's evaluation and before its checkpoint, so that the checkpoint and
    config.json carry the new plan.
    """

    def __init__(self, config, budget, requested, n_steps, console, reserve, changed, estimate):
        self.config, self.budget, self.requested = config, budget, requested
        self.n_steps, self.console, self.reserve = n_steps, console, reserve
        self.changed = changed
        self.epoch_seconds = [estimate]  # the probe's, then each epoch's without SAM
        self.epoch_started = 0.0

    def before_epoch(self, loop: Loop) -> None:
        self.epoch_started = self.budget.elapsed()

    def after_epoch(self, loop: Loop) -> None:
        if loop.epoch < self.config.epochs and self.replan(loop):
            self.changed(loop)

    def replan(self, loop: Loop) -> bool:
        config, n_steps, epoch = self.config, self.n_steps, loop.epoch
        elapsed = self.budget.elapsed()
        epoch_seconds, elapsed = (
            v.item() / loop.world.size
            for v in sum_over_ranks(
                loop.world, *map(torch.tensor, (elapsed - self.epoch_started, elapsed))
            )
        )
        left = self.budget.left(self.reserve, elapsed)
        # an epoch without SAM: this one's time less its own SAM passes' share
        own = sam_steps(config, n_steps, (epoch - 1) * n_steps, epoch * n_steps) / n_steps
        self.epoch_seconds.append(epoch_seconds / (1 + own))
        typical = max(statistics.median(self.epoch_seconds[-RECENT_EPOCHS:]), 1e-9)
        epochs = planned_epochs(config, n_steps, left, typical, epoch, self.requested)
        if epochs == config.epochs:
            return False
        over = (
            "with the probe's estimate"
            if len(self.epoch_seconds) <= RECENT_EPOCHS
            else f"of the latest {RECENT_EPOCHS} epochs"
        )
        say(
            self.console,
            f"time budget {config.max_minutes:g} min: epoch {epoch} took "
            f"{format_seconds(epoch_seconds)} (measured; median {format_seconds(typical)} "
            f"{over}), so {epochs} of {self.requested} epochs instead of the {config.epochs} "
            "planned",
        )
        config.schedule_anchor = schedule_anchor(config, n_steps, loop.step, epochs)
        config.epochs = loop.epochs = epochs
        return True


def schedule_anchor(config: TrainConfig, n_steps: int, step: int, epochs: int) -> list[float]:
    """The anchor of a re-plan at ``step`` to ``epochs``: none while ``step`` is still within
    the new plan's first ``warmup`` share and no anchor was set (the plan re-indexes the
    schedule, which bends only the one-cycle rise); else the step and the share of the
    schedule's last cycle done there under the current plan. A ``freeze_epochs`` run keeps its
    anchor while its first cycle, whose length does not move, is still running."""
    first, steps, anchor = last_cycle_steps(config, n_steps)
    if step < first:
        return config.schedule_anchor
    if not anchor and step - first <= config.warmup * (epochs * n_steps - first):
        return []
    return [step, share_done(step - first, steps, anchor)]


def plan_for_data(config: TrainConfig, source: Source, console: Console) -> None:
    """Choose the values ``config.plan_data`` names (batch size, rate, epochs) from the
    training set's size, and print what was chosen."""
    if not config.plan_data:
        return
    preset = PRESETS[config.preset]
    if "batch_size" in config.plan_data:
        while (
            config.batch_size > SMALLEST_BATCH
            and source.train_size // config.batch_size < MIN_EPOCH_STEPS
        ):
            config.batch_size //= 2
    if "lr" in config.plan_data:
        config.lr = preset["lr"] * config.batch_size / preset["batch_size"]
    n_steps = steps_per_epoch(config, source)
    if "epochs" in config.plan_data:
        config.epochs = max(config.epochs, math.ceil(PLANNED_STEPS / n_steps))
    names = ", ".join("--" + name.replace("_", "-") for name in config.plan_data)
    say(
        console,
        f"sized to the folder's {source.train_size:,} training images: batch "
        f"{config.batch_size}, lr {config.lr:.3g}, {config.epochs} epochs of {n_steps} steps "
        f"({config.epochs * n_steps:,} steps); give {names} or a --preset to set them",
    )
