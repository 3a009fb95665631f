"""A classification step's pieces: one augmented batch, its loss, and SAM's second pass."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reslab.data.transforms import augment, cutmix, random_flip, random_resized_crop, to_input
from reslab.engine.config import TrainConfig
from reslab.engine.schedules import last_cycle_steps, step_at
from reslab.engine.state import TrainState
from reslab.fast import autocast


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
    lam, pasted = 1.0, None
    clean_epoch = state.epoch >= config.epochs - config.clean_epochs
    resized = config.augment and not clean_epoch and config.crop == "resized"
    if resized:  # the window of the whole image, before to_input would resize all of it
        images = random_resized_crop(images, state.spec.size, state.draws)
    x = to_input(images, state.spec)
    if config.augment and clean_epoch:
        x = random_flip(x, state.draws)  # the flip alone
    elif config.augment:
        # the crop pads with black, the background of Fashion-MNIST and torchvision's
        # RandomCrop fill, not with the normalised zero (the mean grey, an edge no test image has)
        padding = 0 if resized else config.crop_padding
        x = augment(x, padding, config.erasing, state.draws, state.spec.black())
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
    """The first optimizer step (counted from 0) that takes SAM's second pass, once
    ``sam_start`` of the schedule's last cycle is done (the only cycle without
    ``freeze_epochs``); None when off."""
    if not config.sam:
        return None
    first, steps, anchor = last_cycle_steps(config, n_steps)
    return first + step_at(config.sam_start, steps, anchor)


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
