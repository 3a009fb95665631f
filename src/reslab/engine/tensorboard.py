"""TensorBoard event files in a run folder: the one hook every trainer adds to its skeleton.

``tensorboard --logdir runs`` then shows each run: scalars per step (the named losses, the
learning rate, the highest of the parameter groups' and each group's where they differ) and per epoch (the losses' means, and what the trainer
records, e.g. train and test accuracy), the images of the run's first batch as the model received them
(augmented; boxes drawn for a detector), and the confusion matrix after each epoch. The files
sit beside ``metrics.jsonl`` / ``log.jsonl``, which stay the runs' records. Only rank 0 writes.

The hook only reads what the step and the other hooks already computed: it draws no random
number and moves no tensor the run uses, so a run's trajectory is the same with it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from reslab.engine.loop import Hook, Loop

# images of the first batch shown; more make the page slow and say nothing new
SHOWN_IMAGES = 32


class TensorBoard(Hook):
    """Event files under ``folder`` (None: none written).

    ``optimizer``: its rates are logged per step. ``epoch_values(loop)``: the epoch's
    named numbers. ``batch_images(loop)``: (N, 3 or 1, H, W) in [0, 1], the batch just
    trained on, asked for after each step until it gives one (None: not images this step). ``confusion(loop)``: (matrix, class names) or None, after
    each epoch.
    """

    def __init__(
        self,
        folder: Path | None,
        optimizer: torch.optim.Optimizer,
        epoch_values: Callable[[Loop], dict[str, float]] | None = None,
        batch_images: Callable[[Loop], torch.Tensor] | None = None,
        confusion: Callable[[Loop], tuple[torch.Tensor, list[str]] | None] | None = None,
    ):
        self.folder, self.optimizer = folder, optimizer
        self.epoch_values, self.batch_images, self.confusion = epoch_values, batch_images, confusion
        self.writer = None
        self.shown = False
        self.sums: dict[str, float] = {}  # the epoch's losses, summed over its steps
        self.steps = 0

    @contextmanager
    def active(self, loop: Loop):
        if self.folder is None or not loop.world.is_main:
            yield
            return
        from torch.utils.tensorboard import SummaryWriter  # imported by training runs alone

        # a resumed run drops the events an interrupted one wrote after its checkpoint
        self.writer = SummaryWriter(
            str(self.folder), purge_step=loop.step + 1 if loop.step else None
        )
        try:
            yield
        finally:
            self.writer.close()
            self.writer = None

    def before_epoch(self, loop: Loop) -> None:
        self.sums, self.steps = {}, 0

    def after_step(self, loop: Loop) -> None:
        if self.writer is None:
            return
        self.steps += 1
        for name, tensor in loop.losses.items():
            value = tensor.item()
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.writer.add_scalar(f"step/{name}", value, loop.step)
        rates = [group["lr"] for group in self.optimizer.param_groups]
        self.writer.add_scalar("step/lr", max(rates), loop.step)
        if len(set(rates)) > 1:  # discriminative rates (--lr-spread): each group's too
            for index, rate in enumerate(rates):
                self.writer.add_scalar(f"step/lr/group{index}", rate, loop.step)
        images = None if self.shown or self.batch_images is None else self.batch_images(loop)
        if images is not None:
            images = images[:SHOWN_IMAGES].detach().float().cpu().clamp(0, 1)
            self.writer.add_images("train/batch", images, loop.step)
            self.shown = True

    def after_epoch(self, loop: Loop) -> None:
        if self.writer is None:
            return
        for name, total in self.sums.items():  # a resumed epoch's: over the steps it ran
            self.writer.add_scalar(f"epoch/mean_{name}", total / self.steps, loop.epoch)
        if self.epoch_values is not None:
            for name, value in self.epoch_values(loop).items():
                self.writer.add_scalar(f"epoch/{name}", value, loop.epoch)
        found = self.confusion(loop) if self.confusion is not None else None
        if found is not None:
            from reslab.engine.plots import confusion_figure

            self.writer.add_figure("test/confusion", confusion_figure(*found), loop.epoch)
        self.writer.flush()


def classification_board(state, step, evaluator) -> TensorBoard:
    """The hook for :func:`reslab.engine.train.fit`: the run's metrics records per epoch,
    the augmented batch as the model receives it, the test set's confusion matrix."""

    def batch_images(loop: Loop) -> torch.Tensor | None:
        x = getattr(step.batch, "x", None)
        if x is None or x.dim() != 4 or x.shape[1] != state.spec.channels:
            return None  # the frozen body's cached features, not images
        return unnormalize(x, state.spec.mean, state.spec.std)

    def confusion(loop: Loop):
        found = evaluator.evaluation
        return None if found is None else (found.confusion, list(state.classes))

    return TensorBoard(
        state.run_dir,
        state.optimizer,
        epoch_values=lambda loop: numbers(state.history[-1]),
        batch_images=batch_images,
        confusion=confusion,
    )


def numbers(record: dict) -> dict[str, float]:
    """The numeric entries of a metrics record, the epoch and step counters left out."""
    return {
        key: float(value)
        for key, value in record.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and key not in ("epoch", "step")
    }


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """A model-input batch back on the [0, 1] scale of its pixels."""
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.detach() * std + mean


def with_boxes(images, targets) -> torch.Tensor:
    """A detector's batch (images in [0, 1] of any sizes, targets with ``boxes``) as one
    (N, 3, H, W) tensor, each image's boxes drawn and padded with black to the largest."""
    from torchvision.utils import draw_bounding_boxes

    drawn = []
    for image, target in zip(images, targets, strict=True):
        pixels = (image.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)
        if pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1)
        boxes = torch.as_tensor(target["boxes"]).detach().float().cpu()
        drawn.append(draw_bounding_boxes(pixels, boxes, colors="red") if len(boxes) else pixels)
    height = max(d.shape[1] for d in drawn)
    width = max(d.shape[2] for d in drawn)
    out = torch.zeros(len(drawn), 3, height, width)
    for index, d in enumerate(drawn):
        out[index, :, : d.shape[1], : d.shape[2]] = d.float() / 255
    return out
