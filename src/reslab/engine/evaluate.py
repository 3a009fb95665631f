"""Test-set evaluation: loss, accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reslab.data.transforms import InputSpec, shifted, to_input
from reslab.fast import autocast


@dataclass
class TopLosses:
    """The test images with the highest loss, highest first (fastai's ``top_losses``)."""

    images: torch.Tensor  # (n, C, H, W) uint8, as the data source gives them
    labels: torch.Tensor  # (n,) true classes
    predicted: torch.Tensor  # (n,) the model's classes
    probability: torch.Tensor  # (n,) the model's probability of its class
    loss: torch.Tensor  # (n,) cross entropy

    def merged(self, other: TopLosses | None, n: int) -> TopLosses:
        """The ``n`` highest of both (of this one alone when ``other`` is None)."""
        parts = [self] if other is None else [self, other]
        loss = torch.cat([p.loss for p in parts])
        keep = loss.topk(min(n, len(loss))).indices
        return TopLosses(*(torch.cat([getattr(p, f) for p in parts])[keep] for f in TOP_FIELDS))


TOP_FIELDS = ("images", "labels", "predicted", "probability", "loss")


@dataclass
class Evaluation:
    loss: float  # mean cross entropy, without label smoothing
    accuracy: float  # fraction correct
    confusion: torch.Tensor  # (K, K) int64, rows = true class, columns = prediction
    views: int = 1  # test-time views averaged for each image (:func:`view_count`)
    top_losses: TopLosses | None = None  # with evaluate(top=n)

    @property
    def per_class(self) -> torch.Tensor:
        """(K,) accuracy of each true class (NaN for a class absent from the set)."""
        counts = self.confusion.sum(1).double()
        return self.confusion.diag().double() / counts


def views(x: torch.Tensor, spec: InputSpec, tta: bool, shift: int) -> Iterator[torch.Tensor]:
    """The test-time views of a model-input batch, one at a time: the batch, then moved
    ``shift`` pixels right, left, down and up when ``shift`` (black borders, as the training
    crops pad), each followed by its mirror image when ``tta``."""
    batches = [x]
    if shift:
        layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        moved = shifted(x, shift, spec.black().to(x.device))
        batches += [v.contiguous(memory_format=layout) for v in moved]
    for batch in batches:
        yield batch
        if tta:
            yield batch.flip(3)


def view_count(tta: bool, shift: int) -> int:
    """How many :func:`views` a test image gets."""
    return (5 if shift else 1) * (2 if tta else 1)


@torch.no_grad()
def logits(
    model: nn.Module,
    images: torch.Tensor,
    spec: InputSpec,
    precision: str = "fp32",
    channels_last: bool = False,
    tta: bool = False,
    shift: int = 0,
) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 logits (N, K), averaged over the test-time
    :func:`views` (``tta``: the mirror image; ``shift``: four one-way moves of that many
    pixels). The images go to the model's device; the logits come back on the CPU."""
    device = next(model.parameters()).device
    x = to_input(images.to(device), spec, channels_last)
    with autocast(precision, device):
        out = sum(model(view).float() for view in views(x, spec, tta, shift))
    out /= view_count(tta, shift)
    return out.cpu()


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    spec: InputSpec,
    num_classes: int,
    precision: str = "fp32",
    channels_last: bool = False,
    tta: bool = False,
    shift: int = 0,
    top: int = 0,
) -> Evaluation:
    """Loss, accuracy and confusion over ``batches`` of (uint8 images, labels); with
    ``top``, also the ``top`` images with the highest loss."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, count, worst = 0.0, 0, None
    try:
        for images, labels in batches:
            out = logits(model, images, spec, precision, channels_last, tta, shift)
            loss_sum += F.cross_entropy(out, labels, reduction="sum").item()
            if top:
                probability, predicted = out.softmax(1).max(1)
                losses = F.cross_entropy(out, labels, reduction="none")
                found = TopLosses(images.cpu(), labels, predicted, probability, losses)
                worst = found.merged(worst, top)
            count += len(labels)
            pairs = labels * num_classes + out.argmax(1)
            confusion += torch.bincount(pairs, minlength=num_classes**2).view(
                num_classes, num_classes
            )
    finally:
        model.train(was_training)
    correct = confusion.diag().sum().item()
    return Evaluation(
        loss_sum / max(count, 1), correct / max(count, 1), confusion, view_count(tta, shift), worst
    )
