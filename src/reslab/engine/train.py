"""The training loop: one function, `fit`, driven by a `TrainConfig`; no argument parsing here.

Determinism: the order of the training set and every augmentation draw in epoch ``e`` come from
a generator seeded with (seed, e), and ``state.step`` counts optimizer steps across epochs, so a
later change can resume mid-epoch or checkpoint every N steps by skipping batches. Hooks
(:class:`Hooks`) run after each step and each epoch; a hook may set ``state.stop`` to end the
run after the current step with a checkpoint (the place for signal handling).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from reslab.data.folders import DEFAULT_SIZE, FolderSource
from reslab.data.sources import Source, fashion_mnist_source
from reslab.data.transforms import InputSpec, augment, cutmix, random_flip, to_input
from reslab.engine.checkpoint import (
    load_checkpoint,
    make_payload,
    require_classifier,
    save_checkpoint,
)
from reslab.engine.config import TrainConfig, validate
from reslab.engine.distributed import (
    World,
    any_rank,
    barrier,
    check_batch,
    init_world,
    sum_over_ranks,
    wrap,
)
from reslab.engine.evaluate import Evaluation, evaluate, logits
from reslab.engine.plots import plot_confusion, plot_curves
from reslab.errors import Interrupted, ReslabError
from reslab.fast import autocast, bf16_supported
from reslab.models import create_model


def open_source(config: TrainConfig) -> Source:
    if config.data is None:
        return fashion_mnist_source(config.data_dir, verify=config.verify)
    return FolderSource(
        config.data,
        size=config.image_size or DEFAULT_SIZE,
        val_fraction=config.val_fraction,
        seed=config.seed,
        workers=config.workers,
        strict=config.strict,
    )


def input_spec(config: TrainConfig, source: Source) -> InputSpec:
    channels = source.channels
    return InputSpec(
        size=config.image_size or source.size,
        source_size=source.size,
        channels=channels,
        mean=tuple(source.mean) if config.normalize else (0.0,) * channels,
        std=tuple(source.std) if config.normalize else (1.0,) * channels,
        stem=config.model_kwargs.get("stem", "registry default"),
    )


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """Independent, reproducible random streams per (seed, epoch): 0 = order, 1 = augment."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 2 + stream)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # no weight decay on batch-norm parameters and biases ("Bag of Tricks", He et al. 2019,
    # section 3.1): decaying them only shrinks the scale that the next layer undoes
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=config.lr)


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Multiplier on the base rate at optimizer step ``step`` of ``total``.

    onecycle: linear rise from lr/25 over the first ``warmup`` of the steps, then cosine decay
    to zero (Smith & Topin 2017, "Super-Convergence"; torch's OneCycleLR without momentum
    cycling). step: x0.1 at 50% and 75% of the steps (He et al. 2015, section 3.4).
    """
    t = min(step / max(total, 1), 1.0)
    if schedule == "onecycle":
        if t < warmup:
            return 0.04 + 0.96 * t / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    return 1.0


@dataclass
class TrainState:
    """Everything that changes during a run; checkpoints are made from it."""

    config: TrainConfig
    model: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    run_dir: Path
    classes: tuple[str, ...]
    spec: InputSpec
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_accuracy: float = -1.0
    history: list[dict] = field(default_factory=list)
    stop: bool = False  # set by a hook to end the run after the current step
    world: World = field(default_factory=World)
    train_model: nn.Module | None = None  # the module stepped: DDP around model, or model
    signal: int = 0  # SIGINT / SIGTERM received; the run stops after the current step
    # mid-epoch position: batches done in the current epoch, its augmentation generator and
    # running sums; saved so that a resumed run takes the very same next step
    batch_in_epoch: int = 0
    draws: torch.Generator | None = None
    sums: tuple[float, int, int] = (0.0, 0, 0)
    resume_progress: dict | None = None

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


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


def new_run_dir(config: TrainConfig) -> Path:
    """``--out`` as given (refused if it has files, unless --force), else
    runs/<date>-<model> with -2, -3, ... appended when taken."""
    if config.out is not None:
        path = Path(config.out)
        if path.is_dir() and any(path.iterdir()) and not config.force:
            raise ReslabError(
                f"run folder {path} exists and is not empty; pass --force to reuse it"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / ".write-test").touch()
            (path / ".write-test").unlink()
        except OSError as error:
            raise ReslabError(
                f"cannot write the run folder {path} ({error.strerror or error}); "
                "pass --out with a writable folder"
            ) from None
        return path
    base = Path("runs") / f"{date.today().isoformat()}-{config.model}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as error:
            raise ReslabError(
                f"cannot create the run folder {path} ({error.strerror or error}); "
                "pass --out with a writable folder"
            ) from None


def checkpoint_payload(state: TrainState, evaluation: Evaluation | None) -> dict:
    extra = {
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "rng": {"torch": torch.get_rng_state()},
        "config": state.config.to_dict(),
        "classes": list(state.classes),
        "input": state.spec.to_dict(),
        "best_accuracy": state.best_accuracy,
        "test_accuracy": evaluation.accuracy if evaluation else None,
        "progress": None,
    }
    if 0 < state.batch_in_epoch and evaluation is None:
        extra["progress"] = {
            "batches": state.batch_in_epoch,
            "draws": state.draws.get_state(),
            "loss_sum": state.sums[0],
            "correct": state.sums[1],
            "seen": state.sums[2],
        }
    if state.ema is not None:
        # "state_dict" holds the averaged weights that eval and predict use; resuming also
        # needs the raw ones the optimizer moves
        extra["train_state_dict"] = state.model.state_dict()
    return make_payload(state.eval_model, "classification", **extra)


def build_state(config: TrainConfig, source: Source, run_dir: Path) -> TrainState:
    kwargs = {**config.model_kwargs, "in_channels": source.channels}
    kwargs["num_classes"] = len(source.classes)
    model = create_model(config.model, **kwargs).to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if config.ema > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        ema.module.spec = model.spec
    optimizer = make_optimizer(config, model)
    n_steps = steps_per_epoch(config, source)
    # reads config.epochs at every step: the time budget may plan again after the first epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(config.schedule, step, config.epochs * n_steps, config.warmup),
    )
    return TrainState(
        config,
        model,
        ema,
        optimizer,
        scheduler,
        run_dir,
        source.classes,
        input_spec(config, source),
    )


def steps_per_epoch(config: TrainConfig, source: Source) -> int:
    return max(source.train_size // config.batch_size, 1)


# --max-minutes: steps timed (after WARMUP_STEPS untimed ones) to estimate an epoch, and the
# share of the budget that the planned epochs may fill (the rest absorbs the estimate's error,
# the final plots and the process start). The first steps of a process pay for oneDNN's
# kernel setup and the allocator's growth: after two untimed steps the default preset's first
# estimate on the AVX2 EPYC was 70-72 s an epoch against 53-55 s measured in the run (so 7 of
# its 20 epochs fitted in 9.5 minutes, and the run ended after 6.3); after six, 56-59 s.
TIMED_STEPS = 12
WARMUP_STEPS = 6
BUDGET_SHARE = 0.97
# The plan is made again after each of the first REPLAN_EPOCHS epochs, from the latest one's
# time: the first epochs of a process can run slower still (best on the EPYC: 183, 175, then
# 159 s). A change this early only bends the rise of a one-cycle schedule (best's rises over
# its first 3.6 epochs); later it would jump the rate in the middle of its decay.
REPLAN_EPOCHS = 3


def now() -> float:
    """The clock that --max-minutes is kept by (a test may replace it with its own)."""
    return time.perf_counter()


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
        timed = itertools.islice(batches, TIMED_STEPS + WARMUP_STEPS)
        for index, (images, labels) in enumerate(timed):
            if index == WARMUP_STEPS:
                started = time.perf_counter()
            _, _, loss = batch_loss(probe, model, images, labels)
            probe.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            probe.optimizer.step()
            if probe.ema is not None:
                probe.ema.update_parameters(probe.model)
            loss.item()  # waits for a GPU to finish the step
        train = (time.perf_counter() - started) / TIMED_STEPS * steps_per_epoch(config, source)
        return train + evaluation_seconds(probe, source)


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


def seconds_left(config: TrainConfig, elapsed: float, reserve: float = 0.0) -> float:
    """What the --max-minutes budget leaves for epochs after ``elapsed`` seconds of the run,
    ``reserve`` seconds (the last evaluation's extra views) set aside."""
    return config.max_minutes * 60 * BUDGET_SHARE - elapsed - reserve


def epochs_within(seconds: float, epoch_seconds: float, most: int) -> int:
    """How many epochs of ``epoch_seconds`` fit in ``seconds``, at most ``most`` (may be 0)."""
    return max(0, min(most, math.floor(seconds / epoch_seconds)))


def planned_epochs(
    config: TrainConfig, n_steps: int, seconds: float, epoch_seconds: float, done: int, most: int
) -> int:
    """The most epochs in all, from ``done`` up to ``most``, whose epochs after ``done`` fit in
    ``seconds``: each takes ``epoch_seconds`` without SAM, and each step that takes SAM's
    second pass (:func:`sam_begins`, which moves with the plan) costs a step more."""
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


# --precision auto keeps bf16 only when its epoch is timed at least this much faster than
# fp32's: bf16 rounds every convolution's inputs, which a gain inside the timing noise does not
# pay for. The issue that set the training targets measured 2.1x for ResNet-18 with bf16
# autocast on a CPU with AVX512-BF16; a 2-core Xeon with AVX512-BF16 measured 0.92x (README).
BF16_MIN_SPEEDUP = 1.15


def choose_precision(
    config: TrainConfig, source: Source, world: World, console: Console
) -> float | None:
    """Resolve ``config.precision == "auto"`` to fp32 or bf16 for this machine.

    On a CPU with native bf16 an epoch is timed in each (:func:`seconds_per_epoch`) and bf16
    is kept if it is at least ``BF16_MIN_SPEEDUP`` times faster; a CPU without native bf16
    and a GPU (whose runs keep the CPU runs' fp32 numerics) get fp32 untimed. Returns the
    chosen precision's epoch estimate, None when nothing was timed.
    """
    if config.device != "cpu" or not bf16_supported():
        config.precision = "fp32"
        why = (
            "a GPU run keeps the CPU runs' fp32 numerics"
            if config.device != "cpu"
            else "this CPU has no native bf16 (AVX512-BF16 or AMX)"
        )
        console.print(f"precision auto: fp32, {why}", markup=False, soft_wrap=True)
        return None
    estimates = {}
    for precision in ("fp32", "bf16"):
        config.precision = precision
        estimates[precision] = shared_epoch_estimate(config, source, world)
    speedup = estimates["fp32"] / estimates["bf16"]
    config.precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    console.print(
        f"precision auto: {config.precision}; an epoch takes about "
        f"{format_time(estimates['fp32'])} in fp32 and {format_time(estimates['bf16'])} in bf16 "
        f"here (measured, bf16 {speedup:.2f}x), and bf16 is kept only when at least "
        f"{BF16_MIN_SPEEDUP:g}x faster",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return estimates[config.precision]


def fit_to_budget(
    config: TrainConfig,
    source: Source,
    world: World,
    started: float,
    console: Console,
    estimate: float | None = None,
    reserve: float = 0.0,
) -> None:
    """Lower ``config.epochs`` to what fits in ``config.max_minutes`` from ``started``, less
    ``reserve`` seconds; ``estimate``: an epoch's seconds if already measured
    (:func:`shared_epoch_estimate`)."""
    if estimate is None:
        estimate = shared_epoch_estimate(config, source, world)
    left = seconds_left(config, now() - started, reserve)
    n_steps = steps_per_epoch(config, source)
    epochs = planned_epochs(config, n_steps, left, estimate, 0, config.epochs)
    if epochs == 0:
        raise ReslabError(
            f"--max-minutes {config.max_minutes:g}: one epoch takes about "
            f"{format_time(estimate)} on this machine (measured), more than the budget leaves "
            "for training; give a larger --max-minutes, or a smaller --width or --batch-size"
        )
    sam = ""
    if config.sam:
        share = sam_steps(replace(config, epochs=epochs), n_steps, 0, epochs * n_steps)
        sam = f", {share / n_steps:.1f} more for SAM's second passes"
    console.print(
        f"time budget {config.max_minutes:g} min: one epoch takes about {format_time(estimate)} "
        f"here (measured), so {epochs} of {config.epochs} epochs{sam}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    config.epochs = epochs


def replan_to_budget(
    config: TrainConfig,
    world: World,
    started: float,
    epoch: int,
    epoch_seconds: float,
    requested: int,
    n_steps: int,
    console: Console,
    reserve: float = 0.0,
) -> bool:
    """After epoch ``epoch`` (one of the first ``REPLAN_EPOCHS``), plan ``config.epochs`` again
    from that epoch's measured seconds (training and evaluation) and the time left: at most
    ``requested``, at least the epochs done. The schedule follows, since it reads
    ``config.epochs`` at every step; SAM's second passes count as steps of ``n_steps`` an
    epoch (:func:`planned_epochs`). Returns whether the plan changed."""
    elapsed = now() - started
    epoch_seconds, elapsed = (
        v.item() / world.size
        for v in sum_over_ranks(world, *map(torch.tensor, (epoch_seconds, elapsed)))
    )
    left = seconds_left(config, elapsed, reserve)
    # an epoch without SAM: this one's time less its own SAM passes' share
    own = sam_steps(config, n_steps, (epoch - 1) * n_steps, epoch * n_steps) / n_steps
    plain = max(epoch_seconds / (1 + own), 1e-9)
    epochs = planned_epochs(config, n_steps, left, plain, epoch, requested)
    if epochs == config.epochs:
        return False
    console.print(
        f"time budget {config.max_minutes:g} min: epoch {epoch} took "
        f"{format_time(epoch_seconds)} (measured), so {epochs} of {requested} epochs instead "
        f"of the {config.epochs} planned",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    config.epochs = epochs
    return True


def restore(state: TrainState, payload: dict) -> None:
    raw = payload.get("train_state_dict", payload["state_dict"])
    state.model.load_state_dict(raw)
    if state.ema is not None:
        state.ema.module.load_state_dict(payload["state_dict"])
        # AveragedModel counts updates; past zero it averages instead of copying
        state.ema.n_averaged.fill_(max(payload["step"], 1))
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.epoch, state.step = payload["epoch"], payload["step"]
    state.best_accuracy = payload["best_accuracy"]
    torch.set_rng_state(payload["rng"]["torch"])
    state.resume_progress = payload.get("progress")
    metrics = state.run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        state.history = [r for r in records if r["epoch"] <= state.epoch]


def resume_config(
    path: str, epochs: int | None = None, device: str | None = None
) -> tuple[TrainConfig, dict, Path]:
    """The saved config of a run (``epochs`` may be raised, ``device`` changed), its
    checkpoint and its folder."""
    payload = load_checkpoint(path)
    run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    require_classifier(
        payload,
        f"continue it with `reslab detect train --resume --out {run_dir}` and its data flags",
    )
    if "config" not in payload or "optimizer" not in payload:
        raise ReslabError(f"{path} holds weights only (no training state); cannot resume")
    config = TrainConfig.from_dict(payload["config"])
    config.resume = str(path)
    if epochs is not None:
        config.epochs = epochs
    if device is not None:
        config.device = device
    validate(config)
    if payload["epoch"] >= config.epochs:
        raise ReslabError(
            f"{path} already finished epoch {payload['epoch']} of {config.epochs}; "
            "pass a larger --epochs to train on"
        )
    return config, payload, run_dir


def describe(config: TrainConfig) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in config.to_dict().items())


@contextmanager
def stop_on_signals(state: TrainState):
    """SIGINT and SIGTERM mark the state; the loop finishes its step, saves and stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        state.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
    start = now()
    world = init_world()
    console = console or Console()
    if not world.is_main:
        console = Console(quiet=True)
    hooks = hooks or Hooks()
    validate(config)
    check_batch(world, config.batch_size)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device != "cpu":
        # fp32 on a GPU as on the CPU: no TF32 rounding of convolution and matmul inputs
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        console.print(
            f"device: {config.device} ({torch.cuda.get_device_name(config.device)})",
            markup=False,
            soft_wrap=True,
        )
    torch.manual_seed(config.seed)
    source = open_source(config)
    if config.precision == "bf16" and not bf16_supported():
        console.print(
            "warning: this CPU has no native bf16 (AVX512-BF16 or AMX); bf16 convolutions fall "
            "back to PyTorch's reference kernels, several times slower than --precision fp32",
            markup=False,
            soft_wrap=True,
        )
    console.print(f"data: {source.description}", markup=False, highlight=False, soft_wrap=True)
    if config.batch_size > source.train_size:
        console.print(
            f"note: --batch-size {config.batch_size} is more than the {source.train_size:,} "
            "training images; each epoch is one step over all of them",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if world.active:
        console.print(
            f"processes: {world.size}; global batch {config.batch_size} "
            f"({config.batch_size // world.size} per process); sync batch norm "
            f"{'on' if config.sync_bn else 'off'}",
            markup=False,
            soft_wrap=True,
        )
    estimate = None
    if config.precision == "auto":
        estimate = choose_precision(config, source, world, console)
    requested, budgeted = config.epochs, bool(config.max_minutes) and payload is None
    reserve = last_evaluation_extra(config, source, world) if budgeted else 0.0
    if budgeted:
        fit_to_budget(config, source, world, start, console, estimate, reserve)
    if world.is_main:
        run_dir = run_dir or new_run_dir(config)
    state = build_state(config, source, run_dir or Path("."))
    state.world = world
    if payload is not None:
        restore(state, payload)
        where = f"step {state.step}" if state.resume_progress else f"epoch {state.epoch}"
        console.print(f"resumed from {config.resume} after {where}", markup=False, soft_wrap=True)
    state.train_model = wrap(state.model, world, config.sync_bn)
    if world.is_main:
        console.print(
            f"config ({run_dir / 'config.json'}):\n{describe(config)}", markup=False, soft_wrap=True
        )
        write_config(config, run_dir)

    n_steps = steps_per_epoch(config, source)
    evaluation = None
    with (
        stop_on_signals(state),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as progress,
    ):
        while state.epoch < config.epochs and not state.stop:
            epoch = state.epoch + 1
            epoch_started = now()
            task = progress.add_task(f"epoch {epoch}/{config.epochs}", total=n_steps, stats="")
            train_loss, train_acc, seconds = train_epoch(
                state, source, epoch, hooks, progress, task
            )
            progress.remove_task(task)
            if state.stop:
                # mid-epoch: keep the step count and weights, not a claim the epoch finished
                if world.is_main:
                    save_checkpoint(run_dir / "last.pt", checkpoint_payload(state, None))
                break
            state.epoch = epoch
            state.batch_in_epoch = 0
            # the --tta-shift views cost several evaluations: the last epoch's alone gets them
            shift = config.tta_shift if epoch == config.epochs else 0
            if world.is_main:  # rank 0 evaluates and writes; the others wait for it
                evaluation = evaluate(
                    state.eval_model,
                    source.test_batches(config.eval_batch_size),
                    state.spec,
                    len(state.classes),
                    config.precision,
                    config.channels_last,
                    config.tta,
                    shift,
                )
            if budgeted and epoch <= REPLAN_EPOCHS:
                # before the checkpoint, so that it and config.json carry the new plan
                seconds_taken = now() - epoch_started
                changed = replan_to_budget(
                    config, world, start, epoch, seconds_taken, requested, n_steps, console, reserve
                )
                if changed and world.is_main:
                    write_config(config, run_dir)
            if world.is_main:
                images_per_s = n_steps * config.batch_size / seconds
                record_epoch(
                    state, evaluation, epoch, train_loss, train_acc, images_per_s, start, console
                )
                hooks.after_epoch(state, state.history[-1])
            barrier(world)

    if state.signal:
        name = signal.Signals(state.signal).name
        folder = run_dir or "rank 0's run folder"  # only rank 0 knows the folder
        raise Interrupted(
            f"stopped by {name} at step {state.step} (epoch {state.epoch + 1}); saved "
            f"{folder}/last.pt. Resume with: reslab train --resume {folder}",
            128 + state.signal,
        )
    if not world.is_main:
        return RunResult(run_dir, math.nan, math.nan, now() - start, None, [], "")
    if evaluation is None:
        raise ReslabError(f"stopped before the first epoch ended; state saved in {run_dir}")
    plot_curves(state.history, run_dir / "curves.png")
    plot_confusion(evaluation.confusion, state.classes, run_dir / "confusion.png")
    seconds = now() - start
    console.print(
        f"test accuracy {100 * evaluation.accuracy:.2f}% (best epoch "
        f"{100 * state.best_accuracy:.2f}%), run folder {run_dir}, took {format_time(seconds)}",
        markup=False,
        highlight=False,
        soft_wrap=True,
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


def write_config(config: TrainConfig, run_dir: Path) -> None:
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def record_epoch(
    state: TrainState,
    evaluation: Evaluation,
    epoch: int,
    train_loss: float,
    train_acc: float,
    images_per_s: float,
    start: float,
    console: Console,
) -> None:
    """Rank 0 after an epoch's evaluation: the metrics record, both checkpoints, the log line."""
    config, run_dir = state.config, state.run_dir
    record = {
        "epoch": epoch,
        "step": state.step,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": evaluation.loss,
        "test_acc": evaluation.accuracy,
        "test_views": evaluation.views,
        "lr": state.optimizer.param_groups[0]["lr"],
        "img_per_s": images_per_s,
        "elapsed_s": now() - start,
    }
    state.history.append(record)
    improved = evaluation.accuracy > state.best_accuracy
    state.best_accuracy = max(state.best_accuracy, evaluation.accuracy)
    checkpoint = checkpoint_payload(state, evaluation)
    save_checkpoint(run_dir / "last.pt", checkpoint)
    if improved:
        save_checkpoint(run_dir / "best.pt", checkpoint)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    views = f" ({evaluation.views} views)" if evaluation.views > 2 else ""
    console.print(
        f"epoch {epoch:>3}/{config.epochs}  train loss {train_loss:.4f} acc "
        f"{100 * train_acc:.2f}%  test loss {evaluation.loss:.4f} acc "
        f"{100 * evaluation.accuracy:.2f}%{views}  lr {record['lr']:.2e}  "
        f"{images_per_s:.0f} img/s  elapsed {record['elapsed_s']:.0f}s",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@dataclass
class Batch:
    """One process's share of an augmented batch, ready for the model: the input, its labels,
    and for CutMix the pasted boxes' labels with the share ``lam`` of the image kept."""

    x: torch.Tensor
    labels: torch.Tensor
    pasted: torch.Tensor | None = None
    lam: float = 1.0


def batch_input(state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> Batch:
    """One global uint8 batch augmented with ``state.draws``, this process's slice of it."""
    config, world = state.config, state.world
    images, labels = images.to(config.device), labels.to(config.device)
    x = to_input(images, state.spec)
    lam, pasted = 1.0, None
    clean_epoch = state.epoch >= config.epochs - config.clean_epochs
    if config.augment and clean_epoch:
        x = random_flip(x, state.draws)  # the flip alone
    elif config.augment:
        # the crop pads with black, the background of Fashion-MNIST and torchvision's
        # RandomCrop fill, not with the normalised zero (the mean grey, an edge no test image has)
        x = augment(x, config.crop_padding, config.erasing, state.draws, state.spec.black())
        x, shuffled, lam = cutmix(x, config.cutmix, state.draws)
        if lam < 1:
            pasted = world.shard(labels[shuffled.to(config.device)])  # the boxes' labels
    x, labels = world.shard(x), world.shard(labels)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return Batch(x, labels, pasted, lam)


def forward_loss(
    config: TrainConfig, model: nn.Module, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the loss of ``batch`` (CutMix mixes the pasted boxes' labels in by area)."""
    with autocast(config.precision, config.device):
        out = model(batch.x).float()
        loss = F.cross_entropy(out, batch.labels, label_smoothing=config.label_smoothing)
        if batch.pasted is not None:
            loss = batch.lam * loss + (1 - batch.lam) * F.cross_entropy(
                out, batch.pasted, label_smoothing=config.label_smoothing
            )
    return out, loss


def batch_loss(
    state: TrainState, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, Batch, torch.Tensor]:
    """:func:`batch_input` then :func:`forward_loss`: the logits, the batch (which SAM's second
    pass runs again) and the loss."""
    batch = batch_input(state, images, labels)
    out, loss = forward_loss(state.config, model, batch)
    return out, batch, loss


def sam_begins(config: TrainConfig, n_steps: int) -> int | None:
    """The first optimizer step (counted from 0) that takes SAM's second pass; None when off."""
    if not config.sam:
        return None
    return math.ceil(config.sam_start * config.epochs * n_steps)


def sam_steps(config: TrainConfig, n_steps: int, first: int, end: int) -> int:
    """How many of the steps ``first`` ... ``end - 1`` take SAM's second pass."""
    begins = sam_begins(config, n_steps)
    return 0 if begins is None else max(0, end - max(first, begins))


@contextmanager
def running_stats_frozen(model: nn.Module):
    """Batch norms normalise with the batch's statistics as usual but leave their running
    statistics alone (momentum 0): SAM's second pass is at perturbed weights, and the step's
    batch is already counted by the first."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, kept, strict=True):
            m.momentum = momentum


def sam_gradient(state: TrainState, model: nn.Module, batch: Batch) -> None:
    """Replace the gradients of the batch's loss by SAM's (Foret et al. 2021, "Sharpness-Aware
    Minimization for Efficiently Improving Generalization", algorithm 1): the weights move
    ``config.sam`` along the normalised gradient (the steepest ascent to first order), the
    loss's gradient is taken there, and the weights move back, so that the optimizer steps
    from where it was with the gradient of the worst point nearby. Under DDP the first
    gradient is already the processes' average, so every process moves alike."""
    params = [p for p in state.model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        moves = [p.grad * (state.config.sam / (norm + 1e-12)) for p in params]
        torch._foreach_add_(params, moves)
    state.optimizer.zero_grad(set_to_none=True)
    with running_stats_frozen(model):
        _, loss = forward_loss(state.config, model, batch)
    loss.backward()
    with torch.no_grad():
        torch._foreach_sub_(params, moves)


def train_epoch(
    state: TrainState, source: Source, epoch: int, hooks: Hooks, progress: Progress, task
) -> tuple[float, float, float]:
    """One pass over the training set; returns mean loss, accuracy and seconds.

    Every process draws the same global batch and augments it with the same generator, then
    keeps its own slice; a resumed epoch skips the batches already taken and restores the
    augmentation generator, so the next step is the one the interrupted run would have taken.
    """
    config, world = state.config, state.world
    model = state.train_model or state.model
    model.train()
    order = epoch_generator(config.seed, epoch, 0)
    state.draws = epoch_generator(config.seed, epoch, 1)
    sam_from = sam_begins(config, steps_per_epoch(config, source))
    skip, loss_sum, correct, seen = 0, 0.0, 0, 0
    progress_in = state.resume_progress
    state.resume_progress = None
    if progress_in is not None:
        skip = progress_in["batches"]
        state.draws.set_state(progress_in["draws"])
        loss_sum, correct, seen = (
            progress_in["loss_sum"],
            progress_in["correct"],
            progress_in["seen"],
        )
        progress.update(task, advance=skip)
    state.batch_in_epoch = skip
    start = time.perf_counter()
    for index, (images, labels) in enumerate(source.train_batches(config.batch_size, order)):
        if index < skip:
            continue
        out, batch, loss = batch_loss(state, model, images, labels)
        labels = batch.labels
        non_finite, signalled = any_rank(world, not torch.isfinite(loss), bool(state.signal))
        if non_finite:
            last = state.run_dir / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
            raise ReslabError(
                f"loss became {loss.item()} at step {state.step + 1} (epoch {epoch}); stopped, "
                f"{kept}. Likely causes: a learning rate too high for this model (try a lower "
                "--lr) or bf16 overflow (try --precision fp32)"
            )
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sam_from is not None and state.step >= sam_from:
            sam_gradient(state, model, batch)
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        state.step += 1
        state.batch_in_epoch = index + 1
        loss_sum += loss.item() * len(labels)
        correct += int((out.argmax(1) == labels).sum())
        seen += len(labels)
        state.sums = (loss_sum, correct, seen)
        progress.update(
            task,
            advance=1,
            stats=f"loss {loss_sum / seen:.4f} acc {100 * correct / seen:.2f}% "
            f"{seen * world.size / (time.perf_counter() - start):.0f} img/s",
        )
        hooks.after_step(state, loss.item())
        if signalled:
            state.stop = True
        elif config.save_every and state.step % config.save_every == 0 and world.is_main:
            save_checkpoint(state.run_dir / "last.pt", checkpoint_payload(state, None))
        if state.stop:
            break
    loss_sum, correct, seen = (
        v.item() for v in sum_over_ranks(world, *map(torch.tensor, (loss_sum, correct, seen)))
    )
    return loss_sum / max(seen, 1), correct / max(seen, 1), time.perf_counter() - start


def format_time(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m {sec:02d}s" if minutes else f"{seconds:.1f}s"
