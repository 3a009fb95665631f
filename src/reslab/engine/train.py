"""Classification training: :func:`fit`, driven by a :class:`TrainConfig`, on the engine's
skeleton (:mod:`reslab.engine.loop`); no argument parsing here.

Determinism: the order of the training set and every augmentation draw in epoch ``e`` come from
a generator seeded with (seed, e), and the loop counts optimizer steps across epochs, so a run
resumes mid-epoch by skipping the batches already taken. :class:`Hooks` lets a caller observe
or steer a run after each step and each epoch; setting ``state.stop`` ends the run after the
current step with a checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from reslab.data.sources import Source
from reslab.engine.batches import Batch, batch_loss, sam_begins, sam_gradient
from reslab.engine.budget import Budget
from reslab.engine.checkpoint import save_checkpoint
from reslab.engine.config import TrainConfig
from reslab.engine.distributed import barrier, init_world, sum_over_ranks, wrap
from reslab.engine.ema import UpdateEma
from reslab.engine.evaluate import Evaluation, evaluate
from reslab.engine.finetune import Cached, FineTune, base_rates, head_loss, rate_factor, with_cache
from reslab.engine.loop import Hook, Loop, StopOnNonFinite, StopOnSignals, run, skip
from reslab.engine.plan import (
    BUDGET_SHARE,
    Replan,
    choose_precision,
    fit_to_budget,
    last_evaluation_extra,
    plan_for_data,
    say,
)
from reslab.engine.plots import plot_confusion, plot_curves
from reslab.engine.runfolder import held_run
from reslab.engine.schedules import Schedule, lr_factor
from reslab.engine.state import (
    SaveEvery,
    SaveStopped,
    TrainState,
    build_state,
    checkpoint_payload,
    describe,
    epoch_generator,
    input_spec,
    make_optimizer,
    new_run_dir,
    prepare,
    restore,
    resume_config,
    steps_per_epoch,
    write_config,
)
from reslab.engine.target import describe_reach, target_reached
from reslab.engine.tensorboard import classification_board
from reslab.errors import Interrupted, ReslabError
from reslab.precision import format_seconds

# the names other modules import from here
__all__ = [
    "Hooks",
    "RunResult",
    "TrainState",
    "epoch_generator",
    "fit",
    "input_spec",
    "lr_factor",
    "make_optimizer",
    "resume_config",
    "steps_per_epoch",
]


class Hooks:
    """Override to observe or steer a run; the defaults do nothing."""

    def after_step(self, state: TrainState, loss: float) -> None:
        pass

    def after_epoch(self, state: TrainState, record: dict) -> None:
        pass


@dataclass
class RunResult:
    run_dir: Path
    test_accuracy: float  # the final model's, on the whole test set
    best_accuracy: float
    seconds: float
    evaluation: Evaluation
    history: list[dict]
    source: str


class ClassifyStep:
    """One optimizer step on a batch: augment, forward, SAM's second pass when due."""

    def __init__(self, state: TrainState, n_steps: int):
        self.state, self.n_steps = state, n_steps
        self.model = state.train_model or state.model
        self.out: torch.Tensor | None = None
        self.batch: Batch | None = None

    def forward(self, batch) -> dict[str, torch.Tensor]:
        if isinstance(batch, Cached):  # the frozen body's features: the head alone
            self.out, self.batch, loss = head_loss(self.state, batch)
        else:
            images, labels = batch
            self.out, self.batch, loss = batch_loss(self.state, self.model, images, labels)
        return {"loss": loss}

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        state = self.state
        state.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        sam_from = sam_begins(state.config, self.n_steps)
        if sam_from is not None and state.step >= sam_from:
            sam_gradient(state, self.model, self.batch)
        state.optimizer.step()


class EpochSums(Hook):
    """The epoch's running loss, accuracy and images (``state.sums``), its progress bar, and
    its training seconds; a resumed epoch starts from the sums it saved."""

    def __init__(self, state: TrainState, step: ClassifyStep, progress: Progress, n_steps: int):
        self.state, self.step, self.progress, self.n_steps = state, step, progress, n_steps
        self.task, self.started, self.seconds = None, 0.0, 0.0
        self.loss, self.accuracy = 0.0, 0.0  # the finished epoch's, over all processes

    def before_epoch(self, loop: Loop) -> None:
        state = self.state
        (state.train_model or state.model).train()
        state.draws = epoch_generator(state.config.seed, loop.epoch + 1, 1)
        state.sums = (0.0, 0, 0)
        resumed = state.resume_progress
        state.resume_progress = None
        if resumed is not None:
            state.draws.set_state(resumed["draws"])
            state.sums = (resumed["loss_sum"], resumed["correct"], resumed["seen"])
        self.task = self.progress.add_task(
            f"epoch {loop.epoch + 1}/{state.config.epochs}",
            total=self.n_steps,
            completed=loop.batch_in_epoch,
            stats="",
        )
        self.started = time.perf_counter()

    def after_step(self, loop: Loop) -> None:
        labels = self.step.batch.labels
        loss_sum, correct, seen = self.state.sums
        loss_sum += loop.loss * len(labels)
        correct += int((self.step.out.argmax(1) == labels).sum())
        seen += len(labels)
        self.state.sums = (loss_sum, correct, seen)
        rate = seen * loop.world.size / (time.perf_counter() - self.started)
        stats = f"loss {loss_sum / seen:.4f} acc {100 * correct / seen:.2f}% {rate:.0f} img/s"
        self.progress.update(self.task, advance=1, stats=stats)

    def after_epoch(self, loop: Loop) -> None:
        self.seconds = time.perf_counter() - self.started
        self.progress.remove_task(self.task)
        totals = sum_over_ranks(loop.world, *map(torch.tensor, self.state.sums))
        loss_sum, correct, seen = (v.item() for v in totals)
        self.loss, self.accuracy = loss_sum / max(seen, 1), correct / max(seen, 1)

    def after_run(self, loop: Loop) -> None:
        if loop.batch_in_epoch and self.task is not None:
            self.progress.remove_task(self.task)


class Evaluate(Hook):
    """Rank 0 scores the model (the average with EMA) on the test set after each epoch; the
    ``--tta-shift`` views, which cost several evaluations, in the last epoch only."""

    def __init__(self, state: TrainState, source: Source):
        self.state, self.source = state, source
        self.evaluation: Evaluation | None = None

    def after_epoch(self, loop: Loop) -> None:
        state, config = self.state, self.state.config
        if not loop.world.is_main:
            return
        shift = config.tta_shift if loop.epoch == config.epochs else 0
        self.evaluation = evaluate(
            state.eval_model,
            self.source.test_batches(config.eval_batch_size),
            state.spec,
            len(state.classes),
            config.precision,
            config.channels_last,
            config.tta,
            shift,
        )


class Record(Hook):
    """Rank 0 after an epoch's evaluation: the metrics record, both checkpoints, the log line,
    then the caller's :class:`Hooks`; every process waits for it."""

    def __init__(self, state, sums, evaluate, schedule, budget, console, hooks, n_steps):
        self.state, self.sums, self.evaluate, self.schedule = state, sums, evaluate, schedule
        self.budget, self.console, self.hooks, self.n_steps = budget, console, hooks, n_steps

    def after_epoch(self, loop: Loop) -> None:
        if loop.world.is_main:
            self.record(loop)
            self.hooks.after_epoch(self.state, self.state.history[-1])
        barrier(loop.world)

    def record(self, loop: Loop) -> None:
        state, evaluation = self.state, self.evaluate.evaluation
        config, run_dir = state.config, state.run_dir
        train_loss, train_acc = self.sums.loss, self.sums.accuracy
        images_per_s = self.n_steps * config.batch_size / self.sums.seconds
        record = {
            "epoch": loop.epoch,
            "step": loop.step,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": evaluation.loss,
            "test_acc": evaluation.accuracy,
            "test_views": evaluation.views,
            "lr": self.schedule.rate(loop),  # the next step's, as a scheduler reports it
            "img_per_s": images_per_s,
            "elapsed_s": self.budget.elapsed(),
        }
        state.history.append(record)
        if target_reached(config.target, state.history) is record:
            record["target_reached"] = True
            say(self.console, f"reached the {config.target:g}% target: {describe_reach(record)}")
        improved = evaluation.accuracy > state.best_accuracy
        state.best_accuracy = max(state.best_accuracy, evaluation.accuracy)
        checkpoint = checkpoint_payload(state, evaluation)
        save_checkpoint(run_dir / "last.pt", checkpoint)
        if improved:
            save_checkpoint(run_dir / "best.pt", checkpoint)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        views = f" ({evaluation.views} views)" if evaluation.views > 2 else ""
        say(
            self.console,
            f"epoch {loop.epoch:>3}/{config.epochs}  train loss {train_loss:.4f} acc "
            f"{100 * train_acc:.2f}%  test loss {evaluation.loss:.4f} acc "
            f"{100 * evaluation.accuracy:.2f}%{views}  lr {record['lr']:.2e}  "
            f"{images_per_s:.0f} img/s  elapsed {record['elapsed_s']:.0f}s",
        )


class CallerHooks(Hook):
    """The caller's :class:`Hooks` after each step."""

    def __init__(self, state: TrainState, hooks: Hooks):
        self.state, self.hooks = state, hooks

    def after_step(self, loop: Loop) -> None:
        self.hooks.after_step(self.state, loop.loss)


def non_finite_message(state: TrainState):
    def message(loop: Loop, bad: dict[str, float]) -> str:
        last = state.run_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
        return (
            f"loss became {bad['loss']} at step {loop.step + 1} (epoch {loop.epoch + 1}); "
            f"stopped, {kept}. Likely causes: a learning rate too high for this model (try a "
            "lower --lr) or bf16 overflow (try --precision fp32)"
        )

    return message


def epoch_batches(state: TrainState, source: Source):
    """The loop's batches: epoch ``e``'s order from its own generator, less the batches a
    resumed epoch already took."""
    config = state.config

    def batches(loop: Loop):
        order = epoch_generator(config.seed, loop.epoch + 1, 0)
        return skip(source.train_batches(config.batch_size, order), loop.batch_in_epoch)

    return batches


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def train_epochs(
    state: TrainState, source: Source, budget: Budget, replan: Replan | None, console, hooks
) -> Evaluation | None:
    """Run the skeleton over the planned epochs; the last evaluation (None if no epoch ended
    on this process)."""
    config, n_steps = state.config, steps_per_epoch(state.config, source)
    step = ClassifyStep(state, n_steps)
    schedule = Schedule(state.optimizer, rate_factor(config, n_steps), base_rates(state))
    evaluator = Evaluate(state, source)
    with progress_bar(console) as progress:
        sums = EpochSums(state, step, progress, n_steps)
        record = Record(state, sums, evaluator, schedule, budget, console, hooks, n_steps)
        chain = [
            schedule,
            StopOnNonFinite(non_finite_message(state)),
            *([UpdateEma(state.ema, state.model)] if state.ema is not None else []),
            sums,
            *([FineTune(state, schedule, console)] if config.freeze_epochs else []),
            CallerHooks(state, hooks),
            StopOnSignals(),
            SaveEvery(state, config.save_every),
            evaluator,
            *([replan] if replan is not None else []),
            record,
            classification_board(state, step, evaluator),
            SaveStopped(state),
        ]
        batches = with_cache(state, source, epoch_batches(state, source))
        run(state.loop, batches, step, chain)
    return evaluator.evaluation


def plan_budget(config, source, world, budget, console, resumed: bool) -> Replan | None:
    """Resolve --precision auto, fit the epochs to --max-minutes, and the hook that plans
    again after each epoch (None without a budget, or on resume)."""
    estimate = None
    if config.precision == "auto":
        estimate = choose_precision(config, source, world, console)
    if not config.max_minutes or resumed:
        return None
    requested = config.epochs
    reserve = last_evaluation_extra(config, source, world)
    estimate = fit_to_budget(config, source, world, budget, console, estimate, reserve)
    return Replan(
        config, budget, requested, steps_per_epoch(config, source), console, reserve, None, estimate
    )


def fit(
    config: TrainConfig,
    console: Console | None = None,
    hooks: Hooks | None = None,
    payload: dict | None = None,
    run_dir: Path | None = None,
) -> RunResult:
    """Train per ``config``; with ``payload`` (a checkpoint) continue in ``run_dir``.

    Under ``torchrun`` every process runs this; rank 0 alone prints and writes files.
    """
    budget = Budget(config.max_minutes, BUDGET_SHARE)
    world = init_world()
    console = console or Console()
    if not world.is_main:
        console = Console(quiet=True)
    source = prepare(config, world, console)
    if payload is None:
        plan_for_data(config, source, console)
    replan = plan_budget(config, source, world, budget, console, payload is not None)
    state = build_state(config, source, Path("."), console, pretrained=payload is None)
    run_dir = (run_dir or new_run_dir(config)) if world.is_main else run_dir
    state.run_dir = run_dir or Path(".")
    state.world = world
    with held_run(run_dir if world.is_main else None, lambda text: say(console, text)):
        return fit_held(state, source, budget, replan, console, hooks or Hooks(), payload)


def fit_held(state: TrainState, source, budget, replan, console, hooks, payload) -> RunResult:
    """:func:`fit` once the run folder is held: restore, train, finish."""
    config, world, run_dir = state.config, state.world, state.run_dir
    if payload is not None:
        dropped = restore(state, payload)
        where = f"step {state.step}" if state.resume_progress else f"epoch {state.epoch}"
        say(console, f"resumed from {config.resume} after {where}")
        if dropped:
            say(
                console,
                f"dropped the records of epochs {dropped[0]}-{dropped[-1]} from metrics.jsonl: "
                "this run trains them again",
            )
    state.train_model = wrap(state.model, world, config.sync_bn)
    if world.is_main:
        say(console, f"config ({run_dir / 'config.json'}):\n{describe(config)}")
        write_config(config, run_dir)
    if replan is not None:
        replan.changed = lambda loop: world.is_main and write_config(config, run_dir)
    evaluation = train_epochs(state, source, budget, replan, console, hooks)
    return finish(state, evaluation, budget, source, console)


def finish(state: TrainState, evaluation, budget: Budget, source: Source, console) -> RunResult:
    """After the loop: the signal's exit, or rank 0's plots, summary line and result."""
    world, run_dir = state.world, state.run_dir
    received = state.loop.extra.get("signal", 0)
    if received:
        name = signal.Signals(received).name
        folder = run_dir if world.is_main else "rank 0's run folder"
        raise Interrupted(
            f"stopped by {name} at step {state.step} (epoch {state.epoch + 1}); saved "
            f"{folder}/last.pt. Resume with: reslab train --resume {folder}",
            128 + received,
        )
    if not world.is_main:
        return RunResult(run_dir, math.nan, math.nan, budget.elapsed(), None, [], "")
    if evaluation is None:
        raise ReslabError(f"stopped before the first epoch ended; state saved in {run_dir}")
    plot_curves(state.history, run_dir / "curves.png")
    plot_confusion(evaluation.confusion, state.classes, run_dir / "confusion.png")
    seconds = budget.elapsed()
    target = state.config.target
    if target:
        first = target_reached(target, state.history)
        reach = f"reached at {describe_reach(first)}" if first else "not reached"
        say(console, f"target {target:g}%: {reach}")
    say(
        console,
        f"test accuracy {100 * evaluation.accuracy:.2f}% (best epoch "
        f"{100 * state.best_accuracy:.2f}%), run folder {run_dir}, took {format_seconds(seconds)}",
    )
    return RunResult(
        run_dir,
        evaluation.accuracy,
        state.best_accuracy,
        seconds,
        evaluation,
        state.history,
        source.description,
    )
