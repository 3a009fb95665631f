"""Training the C4 detector on the engine's loop, and rebuilding one from its checkpoint.

The model returns named losses (torchvision's detection convention); the step sums them, the
log records each, and :class:`~reslab.engine.loop.StopOnNonFinite` stops the run on the first
non-finite value before it reaches the weights, so the last checkpoint on disk stays the last
good one. The schedule, the EMA and the time budget are the engine's hooks.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch.utils.data import DataLoader, DistributedSampler

from reslab.data.coco import CocoDetection, collate
from reslab.engine.budget import Budget, StopAtDeadline, now
from reslab.engine.checkpoint import load_checkpoint, make_payload, save_checkpoint
from reslab.engine.detect_config import DetectTrainConfig
from reslab.engine.distributed import World, check_batch, wrap
from reslab.engine.ema import UpdateEma, make_ema, restore_ema
from reslab.engine.loop import Hook, Loop, NonFiniteLoss, StopOnNonFinite, run
from reslab.engine.schedules import Schedule, warmup_cosine
from reslab.engine.tensorboard import TensorBoard, with_boxes
from reslab.errors import ReslabError
from reslab.fast import autocast
from reslab.models.detection import SPEC_NAME, DetectorConfig, build_detector
from reslab.precision import format_seconds

__all__ = [
    "LOSS_NAMES",
    "DetectTrainConfig",
    "NonFiniteLoss",
    "detector_from_checkpoint",
    "train_detector",
]

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


def detector_from_checkpoint(payload: dict):
    """Rebuild the detector from a checkpoint's config and load its weights strictly."""
    if payload.get("task") != "detection" or payload["model"]["name"] != SPEC_NAME:
        raise ReslabError(
            f"this checkpoint holds a {payload.get('task')} model "
            f"({payload['model']['name']}), not a detector"
        )
    model = build_detector(DetectorConfig.from_dict(payload["model"]["kwargs"]))
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ReslabError(
            "the checkpoint's weights do not fit its detector config: " + " ".join(lines[1:3])[:300]
        ) from None
    return model


class DetectionStep:
    """One SGD step of the detector: its named losses and ``"loss"``, their sum, under
    ``precision``'s autocast; then the update with the gradient norm clipped."""

    def __init__(self, model, optimizer, params, clip: float, precision: str):
        self.model, self.optimizer, self.params = model, optimizer, params
        self.clip, self.precision = clip, precision
        self.values: dict[str, float] = {}  # the latest named losses
        self.batch = None  # the latest (images, targets)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        images, targets = self.batch = batch
        with autocast(self.precision):
            losses = self.model(list(images), list(targets))
        self.values = {name: value.item() for name, value in losses.items()}
        return {**losses, "loss": sum(losses.values())}

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()


class AnnealedSchedule(Schedule):
    """The engine's schedule, leaving the rates alone before a step that will not be taken
    (the deadline passed), so a checkpoint's optimizer holds the last step's rate."""

    def before_step(self, loop: Loop) -> None:
        if not loop.stop:
            super().before_step(loop)


def phase(step: int, warmup: int, progress: float) -> str:
    """Where :func:`~reslab.engine.schedules.warmup_cosine` is: the warm-up, the cosine's
    first half (main) or its second, where the rate falls below half its peak (anneal)."""
    if step < warmup:
        return "warm-up"
    return "anneal" if progress >= 0.5 else "main"


class StepLog(Hook):
    """``log.jsonl``, one record per step (epoch, step, rate, losses), and the progress line:
    the phase, steps per second, the time left (by the budget when there is one), and the
    four losses smoothed (an exponential average, 0.9 per step); ``last`` holds the latest
    step's losses, their sum first."""

    SMOOTHING = 0.9

    def __init__(self, path: Path | None, append: bool, step: DetectionStep, total: int, console):
        self.path, self.append, self.step, self.total = path, append, step, total
        self.console = console
        self.last: dict[str, float] = {}
        self.smooth: dict[str, float] = {}
        self.budget, self.warmup = Budget(0), 0  # set by train_detector
        self.started, self.first = now(), 0

    @contextmanager
    def active(self, loop: Loop):
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with (
            Progress(*columns, console=self.console, transient=False) as self.progress,
            # a resumed run adds to its log; a new one in a used folder starts it afresh
            open(self.path or os.devnull, "a" if self.append else "w", buffering=1) as self.log,
        ):
            self.task = self.progress.add_task(
                "train", total=self.total, completed=loop.step, status=""
            )
            self.started, self.first = now(), loop.step
            yield

    def before_epoch(self, loop: Loop) -> None:
        self.progress.update(self.task, description=f"epoch {loop.epoch + 1}/{loop.epochs}")

    def status(self, loop: Loop) -> str:
        """Phase, steps/s, time left and the smoothed losses, in one line."""
        rate = (loop.step - self.first) / max(now() - self.started, 1e-9)
        left = (self.total - loop.step) / max(rate, 1e-9)
        if self.budget.limited:
            left = min(left, max(0.0, self.budget.left()))
        progress = max(loop.step / self.total, self.budget.used())
        losses = " ".join(
            f"{name.removeprefix('loss_')}={self.smooth[name]:.3f}"
            for name in LOSS_NAMES
            if name in self.smooth
        )
        return (
            f"{phase(loop.step, self.warmup, progress)} {rate:.2f} steps/s "
            f"eta {format_seconds(left)} {losses}"
        )

    def after_step(self, loop: Loop) -> None:
        values = self.step.values
        self.last = {"loss": sum(values.values()), **values}
        lr = self.step.optimizer.param_groups[0]["lr"]
        record = {"epoch": loop.epoch, "step": loop.step, "lr": lr, **self.last}
        self.log.write(json.dumps(record) + "\n")
        a = self.SMOOTHING
        self.smooth = {k: a * self.smooth.get(k, v) + (1 - a) * v for k, v in values.items()}
        self.progress.update(self.task, advance=1, status=self.status(loop))


class DetectionCheckpoint(Hook):
    """``out/last.pt`` after each epoch and when the budget stops the run inside one (its
    epoch then recorded as unfinished), with the line that reports it."""

    def __init__(self, out: Path, world: World, console, payload, log: StepLog, minutes: float):
        self.out, self.world, self.console, self.payload = out, world, console, payload
        self.log, self.minutes = log, minutes

    def save(self, loop: Loop) -> None:
        if self.world.is_main:
            save_checkpoint(self.out / "last.pt", self.payload(loop.epoch, loop.step))

    def after_epoch(self, loop: Loop) -> None:
        self.save(loop)
        losses = ", ".join(f"{k}={v:.4f}" for k, v in self.log.last.items())
        self.console.print(f"epoch {loop.epoch}: step {loop.step}, " + losses)

    def after_run(self, loop: Loop) -> None:
        if loop.stop:  # the time budget ran out inside an epoch: keep the work
            self.save(loop)
            self.console.print(
                f"time budget of {self.minutes} min spent at step {loop.step} "
                f"(epoch {loop.epoch + 1} of {loop.epochs})"
            )


def _loader(dataset: CocoDetection, config: DetectTrainConfig, world: World, epoch: int):
    if world.active:
        sampler = DistributedSampler(dataset, world.size, world.rank, True, config.seed, True)
        sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset, config.batch_size // world.size, sampler=sampler, collate_fn=collate
        )
    else:
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(config.seed + epoch),
            drop_last=True,
        )
    if len(loader) == 0:
        raise ReslabError(
            f"{len(dataset)} images make no full batch of {config.batch_size}; lower --batch-size"
        )
    return loader


def _payload_maker(model, ema, optimizer, config, dataset: CocoDetection, rescorer, plan):
    """``payload(epoch, step)``: a checkpoint of the run as it stands."""

    def payload(epoch: int, step: int) -> dict:
        extra = {} if rescorer is None else {"rescorer": rescorer}
        if plan is not None:
            extra["plan"] = plan
        saved = model
        if ema is not None:
            # "state_dict" holds the averaged weights that eval and predict load; resuming
            # also needs the raw ones the optimizer moves
            extra["train_state_dict"] = model.state_dict()
            saved = ema.module
        return make_payload(
            saved,
            task="detection",
            optimizer=optimizer.state_dict(),
            epoch=epoch,
            step=step,
            train_config=asdict(config),
            class_names=list(dataset.class_names),
            category_ids=list(dataset.category_ids),
            rng_state=torch.get_rng_state(),
            **extra,
        )

    return payload


def _non_finite(out: Path, step: DetectionStep):
    def message(loop: Loop, bad: dict) -> str:
        values = step.values
        names = [name for name, value in values.items() if not math.isfinite(value)]
        kept = out / "last.pt"
        return (
            f"non-finite {', '.join(names)} at step {loop.step} ({values}); stopped before "
            f"the update; last good checkpoint: {kept if kept.exists() else 'none yet'}"
        )

    return message


def _restore(payload: dict, out: Path, model, optimizer, console) -> None:
    model.load_state_dict(payload.get("train_state_dict", payload["state_dict"]))
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng_state"])
    console.print(
        f"resumed from {out / 'last.pt'} at epoch {payload['epoch']}, step {payload['step']}"
    )


def train_detector(
    model,
    dataset: CocoDetection,
    config: DetectTrainConfig,
    out: str | Path,
    resume: bool = False,
    console: Console | None = None,
    world: World | None = None,
    rescorer: dict | None = None,
    plan: dict | None = None,
) -> dict:
    """Train, writing ``out/last.pt`` after each epoch and ``out/log.jsonl`` per step.

    Returns the last logged losses. With ``resume`` the model, optimizer, step, epoch and RNG
    state come from ``out/last.pt``. With ``config.ema`` the checkpoints hold the moving
    average of the weights, and ``model`` holds it when this returns. Under torchrun
    (``world``) each process takes its share of every global batch of ``config.batch_size``
    images through a DistributedSampler, DDP averages the gradients, and only rank 0 writes
    files. ``rescorer``, a trained :class:`~reslab.engine.rescore.Rescorer`'s payload, rides in
    every checkpoint (a resumed run keeps the one its checkpoint has), as does ``plan``, the
    record of a planned recipe (:mod:`reslab.engine.detect_plan`).
    """
    world = world or World()
    check_batch(world, config.batch_size)
    console = console or Console()
    out = Path(out)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=config.scaled_lr(), momentum=config.momentum, weight_decay=config.weight_decay
    )
    payload = load_checkpoint(out / "last.pt") if resume else None
    loop = Loop(epochs=config.epochs, world=world)
    if payload is not None:
        loop.epoch, loop.step = payload["epoch"], payload["step"]
        rescorer = rescorer or payload.get("rescorer")
    loader = _loader(dataset, config, world, loop.epoch)
    total = config.epochs * len(loader)
    if world.is_main:
        record = {"detector": model.spec["kwargs"], "train": asdict(config)}
        (out / "config.json").write_text(json.dumps(record, indent=1))
    budget = Budget(config.max_minutes)
    schedule = _schedule(optimizer, config, total, budget)
    if payload is not None:
        _restore(payload, out, model, optimizer, console)
    model.train()
    # oneDNN's convolutions run faster in channels_last; checkpoints load in either layout
    model.to(memory_format=torch.channels_last)
    ema = make_ema(model, config.ema)
    if ema is not None and payload is not None:
        restore_ema(ema, payload["state_dict"], payload["step"])
    trained = wrap(model, world, sync_bn=False)
    step = DetectionStep(trained, optimizer, params, config.clip_grad_norm, config.precision)
    log = StepLog(out / "log.jsonl" if world.is_main else None, resume, step, total, console)
    log.budget, log.warmup = budget, config.warmup_iters
    save = _payload_maker(model, ema, optimizer, config, dataset, rescorer, plan)
    hooks = [
        StopAtDeadline(budget),
        schedule,
        StopOnNonFinite(_non_finite(out, step)),
        *([UpdateEma(ema, model)] if ema is not None else []),
        log,
        DetectionCheckpoint(out, world, console, save, log, config.max_minutes),
        TensorBoard(out, optimizer, batch_images=lambda loop: with_boxes(*step.batch)),
    ]
    run(loop, lambda loop: _epoch(loader, world, loop), step, hooks)
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return log.last


def _schedule(optimizer, config: DetectTrainConfig, total: int, budget: Budget) -> Schedule:
    """Warm-up, then cosine over the larger share of the steps and of the budget. Made before
    a resumed optimizer's state is loaded, so the base rate is the recipe's."""
    return AnnealedSchedule(
        optimizer,
        lambda loop: warmup_cosine(
            loop.step, config.warmup_iters, max(loop.step / total, budget.used())
        ),
    )


def _epoch(loader: DataLoader, world: World, loop: Loop) -> DataLoader:
    if world.active:
        loader.sampler.set_epoch(loop.epoch)
    return loader
