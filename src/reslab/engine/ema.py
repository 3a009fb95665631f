"""The exponential moving average of a model's weights and batch-norm statistics (Polyak
averaging), built in this one place for every trainer, and the hook that updates it."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from reslab.engine.loop import Hook, Loop


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An average of ``model`` with ``decay`` per step (its buffers averaged too); None for 0.

    The first update copies the weights; each later one moves the average ``1 - decay`` of
    the way to them (``torch.optim.swa_utils.get_ema_multi_avg_fn``).
    """
    if not decay:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if hasattr(model, "spec"):
        ema.module.spec = model.spec
    return ema


def restore_ema(ema: AveragedModel, averaged: dict, steps: int) -> None:
    """Load a checkpoint's averaged weights into ``ema``, ``steps`` updates in: past zero
    updates AveragedModel averages instead of copying."""
    ema.module.load_state_dict(averaged)
    ema.n_averaged.fill_(max(steps, 1))


class UpdateEma(Hook):
    """After each step, ``ema`` takes in ``model``'s weights."""

    def __init__(self, ema: AveragedModel, model: nn.Module):
        self.ema, self.model = ema, model

    @torch.no_grad()
    def after_step(self, loop: Loop) -> None:
        self.ema.update_parameters(self.model)
