"""Fine-tuning's two phases as hooks on the training skeleton, and the frozen body's cached
features.

A run with ``freeze_epochs`` first trains the head alone: the body's parameters take no
gradient (so the backward pass stops at the head) and its batch norms normalise with their
running statistics, which stay as the pretrained weights left them (``train_bn`` keeps them
training, with their scale and shift, as fastai does). Then every parameter trains, each part
at its own rate (:func:`reslab.engine.state.part_rates`). Each phase runs its own one-cycle
(:func:`reslab.engine.schedules.phased`); this hook sets the schedule's base rates per phase.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from rich.console import Console
from torch import nn

from reslab.data.sources import Source, train_order
from reslab.data.transforms import to_input
from reslab.engine.batches import Batch, forward_loss
from reslab.engine.loop import Hook, Loop, skip
from reslab.engine.schedules import Schedule, phased
from reslab.engine.state import TrainState, epoch_generator, model_parts, say
from reslab.errors import ReslabError
from reslab.fast import autocast

NORMS = nn.modules.batchnorm._BatchNorm


def body_norms(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if isinstance(m, NORMS) and name != "fc"]


def set_frozen(model: nn.Module, frozen: bool, train_bn: bool) -> None:
    """Freeze the body (every part but the head) or unfreeze the whole model. Frozen, the
    body's batch norms are in eval mode unless ``train_bn``, which also keeps their scale and
    shift trainable. Call after ``model.train()``, which puts every norm back in train mode."""
    for part, named in model_parts(model).items():
        for _, param in named:
            norm_param = param.ndim == 1  # a batch norm's scale or shift (convs have no bias)
            param.requires_grad_(not frozen or part == "head" or (train_bn and norm_param))
    if frozen and not train_bn:
        for norm in body_norms(model):
            norm.eval()


def rate_factor(config, n_steps: int):
    """The schedule's factor at the loop's step: one cycle over the run, or with
    ``freeze_epochs`` one over the frozen epochs and one over the rest. It reads
    ``config.epochs`` and ``config.schedule_anchor`` at every step: the time budget plans again
    after each epoch."""

    def factor(loop: Loop) -> float:
        first, total = config.freeze_epochs * n_steps, config.epochs * n_steps
        return phased(
            config.schedule, loop.step, first, total, config.warmup, config.schedule_anchor
        )

    return factor


def base_rates(state: TrainState) -> list[float]:
    """Each optimizer group's peak rate: its part's (``base_lr``) or ``lr``."""
    return [g.get("base_lr", state.config.lr) for g in state.optimizer.param_groups]


class FineTune(Hook):
    """The frozen phase for the first ``freeze_epochs`` epochs, then the whole network: before
    each epoch the model's parameters are frozen or not and ``schedule.base`` is the phase's
    rates (frozen: ``freeze_lr`` for every group; then each group's ``base_lr``). Placed after
    the hook that puts the model in train mode."""

    def __init__(self, state: TrainState, schedule: Schedule, console: Console):
        self.state, self.schedule, self.console = state, schedule, console
        config = state.config
        self.frozen_lr = config.freeze_lr or 2 * config.lr
        self.unfrozen = base_rates(state)
        self.phase: bool | None = None

    def before_run(self, loop: Loop) -> None:
        if loop.world.active:
            raise ReslabError("--freeze-epochs trains in one process; run it without torchrun")

    def before_epoch(self, loop: Loop) -> None:
        config, model = self.state.config, self.state.model
        frozen = loop.epoch < config.freeze_epochs
        set_frozen(model, frozen, config.train_bn)
        groups = len(self.state.optimizer.param_groups)
        self.schedule.base = [self.frozen_lr] * groups if frozen else list(self.unfrozen)
        if frozen != self.phase:
            self.phase = frozen
            say(self.console, self.describe(loop, frozen))

    def describe(self, loop: Loop, frozen: bool) -> str:
        config = self.state.config
        if frozen:
            norms = "training" if config.train_bn else "in eval mode"
            cached = ", on cached features" if config.cache_features else ""
            return (
                f"fine-tuning: epochs {loop.epoch + 1}-{config.freeze_epochs} train the head "
                f"alone (body frozen, batch norm {norms}{cached}), peak lr {self.frozen_lr:.2g}"
            )
        low, high = min(self.unfrozen), max(self.unfrozen)
        return (
            f"fine-tuning: epochs {loop.epoch + 1}-{config.epochs} train the whole network, "
            f"peak lr {low:.2g} (stem) to {high:.2g} (head)"
        )


@dataclass
class Cached:
    """A batch of the frozen body's pooled features, (N, C), and their labels."""

    features: torch.Tensor
    labels: torch.Tensor


@contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode, each module's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


class FeatureCache:
    """The body's pooled features of every training image, un-augmented, computed on first use;
    the frozen epochs' batches are drawn from them in the order the images would be."""

    def __init__(self, state: TrainState, source: Source):
        self.state, self.source = state, source
        self.features: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    @torch.no_grad()
    def compute(self) -> None:
        state, config = self.state, self.state.config
        features, labels = [], []
        batches = self.source.train_batches(config.eval_batch_size, None, drop_last=False)
        with evaluating(state.model):
            for images, batch_labels in batches:
                x = to_model_input(state, images)
                with autocast(config.precision, config.device):
                    pooled = state.model.avgpool(state.model.forward_features(x))
                features.append(pooled.flatten(1).float())  # (N, C)
                labels.append(batch_labels.to(config.device))
        self.features, self.labels = torch.cat(features), torch.cat(labels)

    def batches(self, loop: Loop):
        if self.features is None:
            self.compute()
        config = self.state.config
        order = epoch_generator(config.seed, loop.epoch + 1, 0)
        for index in train_order(len(self.labels), config.batch_size, order):
            yield Cached(self.features[index], self.labels[index])


def to_model_input(state: TrainState, images: torch.Tensor) -> torch.Tensor:
    """A uint8 batch as the model's input, un-augmented (the frozen body's view of it)."""
    x = to_input(images.to(state.config.device), state.spec)
    if state.config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def head_loss(state: TrainState, cached: Cached) -> tuple[torch.Tensor, Batch, torch.Tensor]:
    """The head's logits and loss on cached features: :func:`forward_loss` with the model's
    ``forward_head`` (a 1x1 map pools to itself)."""
    batch = Batch(cached.features[:, :, None, None], cached.labels)  # (N, C, 1, 1)
    out, loss = forward_loss(state.config, state.model.forward_head, batch)
    return out, batch, loss


def with_cache(state: TrainState, source: Source, batches):
    """The loop's batches: ``batches(loop)``, but cached features in the frozen epochs when
    ``cache_features`` is on."""
    if not state.config.cache_features:
        return batches
    cache = FeatureCache(state, source)

    def phased(loop: Loop):
        if loop.epoch < state.config.freeze_epochs:
            return skip(cache.batches(loop), loop.batch_in_epoch)
        return batches(loop)

    return phased
