"""Test-set evaluation: loss, accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reslab.data.transforms import InputSpec, to_input
from reslab.fast import autocast


@dataclass
class Evaluation:
    loss: float  # mean cross entropy, without label smoothing
    accuracy: float  # fraction correct
    confusion: torch.Tensor  # (K, K) int64, rows = true class, columns = prediction

    @property
    def per_class(self) -> torch.Tensor:
        """(K,) accuracy of each true class (NaN for a class absent from the set)."""
        counts = self.confusion.sum(1).double()
        return self.confusion.diag().double() / counts


@torch.no_grad()
def logits(
    model: nn.Module,
    images: torch.Tensor,
    spec: InputSpec,
    precision: str = "fp32",
    channels_last: bool = False,
    tta: bool = False,
) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 logits (N, K). With ``tta`` the logits of each image and
    its mirror image are averaged (flip test-time augmentation). The images go to the model's
    device; the logits come back on the CPU."""
    device = next(model.parameters()).device
    x = to_input(images.to(device), spec, channels_last)
    with autocast(precision, device):
        out = model(x).float()
        if tta:
            out = (out + model(x.flip(3)).float()) / 2
    return out.cpu()


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    spec: InputSpec,
    num_classes: int,
    precision: str = "fp32",
    channels_last: bool = False,
    tta: bool = False,
) -> Evaluation:
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, count = 0.0, 0
    try:
        for images, labels in batches:
            out = logits(model, images, spec, precision, channels_last, tta)
            loss_sum += F.cross_entropy(out, labels, reduction="sum").item()
            count += len(labels)
            pairs = labels * num_classes + out.argmax(1)
            confusion += torch.bincount(pairs, minlength=num_classes**2).view(
                num_classes, num_classes
            )
    finally:
        model.train(was_training)
    correct = confusion.diag().sum().item()
    return Evaluation(loss_sum / max(count, 1), correct / max(count, 1), confusion)
