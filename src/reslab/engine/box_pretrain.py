"""A warm start for a C4 detector: its trunk, res5 head and class scores first learn to name the
training set's ground-truth objects, as an image classifier on crops around their boxes.

Detection training teaches the classifier slowly: every step pays for the trunk on whole images
and the RPN, and only a few sampled RoIs per image carry a class. A crop around one object costs
the trunk a small fraction of a scene, so the same minutes show the head many more labelled
objects. The crop's object box goes through the detector's own RoIAlign and head, so what the
classifier learns is the path detection uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torchvision.ops import box_convert, roi_align

from reslab.data.coco import CocoDetection
from reslab.engine.budget import Budget, StopAtDeadline
from reslab.engine.checkpoint import save_checkpoint
from reslab.engine.loop import Every, Hook, Loop, run
from reslab.engine.schedules import Schedule, warmup_cosine
from reslab.errors import ReslabError
from reslab.fast import autocast
from reslab.models.detection import mirror_boxes
from reslab.precision import format_seconds

# the side of the pretraining's crops, in pixels of the detector's resized images
CROP_SIDE = 128


def detector_size(model) -> tuple[int, int]:
    """The (min_size, max_size) a torchvision detector resizes its images to."""
    return model.transform.min_size[0], model.transform.max_size


def detector_scale(height: int, width: int, size: tuple[int, int]) -> float:
    """The factor by which a detector with ``size`` = (min_size, max_size) resizes an image:
    the shorter side to min_size unless the longer side would pass max_size (torchvision's
    ``GeneralizedRCNNTransform``)."""
    return min(size[0] / min(height, width), size[1] / max(height, width))


def box_crops(
    dataset: CocoDetection,
    side: int = 64,
    margin: float = 0.15,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A square crop around every ground-truth box, resized to ``side`` pixels.

    The square is the box's longer side plus ``margin`` of it on each side, centred on the box
    (outside the image: black). With ``size``, a detector's (min_size, max_size), the square
    spans at least ``side`` pixels of the image as that detector resizes it, so an object that
    fits keeps the size in pixels the detector sees it at, among the black canvas and the
    neighbours around it. Returns the crops (N, 3, side, side) uint8, each box in its crop's
    pixels (N, 4) xyxy, and the labels (N,) in the detector's numbering (1..).
    """
    crops, boxes, labels = [], [], []
    for index, info in enumerate(dataset.images):
        anns = dataset.annotations[info["id"]]
        if not anns:
            continue
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        centre = xywh[:, :2] + xywh[:, 2:] / 2
        half = xywh[:, 2:].amax(1, keepdim=True) * (0.5 + margin)
        image = dataset.load_image(index).float().unsqueeze(0)
        if size is not None:
            resize = detector_scale(image.shape[-2], image.shape[-1], size)
            half = half.clamp(min=side / resize / 2)
        squares = torch.cat([centre - half, centre + half], 1)
        crops.append(roi_align(image, [squares], side, aligned=True).round().to(torch.uint8))
        scale = side / (2 * half)
        inside = box_convert(xywh, "xywh", "xyxy") - squares[:, :2].repeat(1, 2)
        boxes.append(inside * scale)
        labels += [dataset.label_of[a["category_id"]] for a in anns]
    if not labels:
        raise ReslabError(f"{dataset.annotation_file} has no boxes to pretrain the classifier on")
    return torch.cat(crops), torch.cat(boxes), torch.tensor(labels)


def crop_logits(model, crops: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Class scores of the detector's head for uint8 crops and the boxes in them, through the
    trunk, the detector's RoIAlign, res5 and the class layer (no box deltas, no background
    suppression): what :func:`pretrain_box_classifier` trains."""
    heads = model.roi_heads
    mean = torch.tensor(model.transform.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.transform.image_std).view(1, 3, 1, 1)
    x = ((crops.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    side = tuple(crops.shape[-2:])
    pooled = heads.box_roi_pool(
        {"0": model.backbone(x)}, list(boxes.unsqueeze(1)), [side] * len(crops)
    )
    return heads.box_predictor.cls_score(heads.box_head(pooled))


def detector_crops(
    model, dataset: CocoDetection, side: int = CROP_SIDE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`box_crops` at ``model``'s scale: the crops :func:`pretrain_box_classifier` trains
    on, and the ones to score it on."""
    return box_crops(dataset, side, size=detector_size(model))


def check_jitter(amount: float) -> None:
    """--pretrain-jitter's range: an edge moved by half the side could cross the other edge."""
    if not 0 <= amount < 0.5:
        raise ReslabError(f"--pretrain-jitter must be at least 0 and below 0.5, got {amount:g}")


def jitter_boxes(
    boxes: torch.Tensor, amount: float, side: int, generator: torch.Generator
) -> torch.Tensor:
    """xyxy boxes in ``side``-pixel crops with each edge moved by up to ``amount`` of the box's
    width (x) or height (y), uniformly and independently, kept inside the crop and at least a
    pixel wide: boxes like the proposals near an object that detection's head is given."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * amount * size
    moved = (boxes + noise).clamp(0, side)
    moved[:, 2:] = torch.maximum(moved[:, 2:], moved[:, :2] + 1)
    return moved


@torch.no_grad()
def crop_accuracy(model, crops: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of crops whose highest class score (background left out) is their label."""
    was_training = model.training
    model.eval()
    right = 0
    for index in torch.arange(len(labels)).split(256):
        logits = crop_logits(model, crops[index], boxes[index])
        right += int((logits[:, 1:].argmax(1) + 1 == labels[index]).sum())
    model.train(was_training)
    return right / len(labels)


class ClassifierStep:
    """A training step of a classifier for :func:`~reslab.engine.loop.run`: ``scores(batch)``
    gives a batch's class scores and labels; the losses are the cross-entropy (``"loss"``) and
    the share of the batch named right (``"accuracy"``); the update is one optimizer step."""

    def __init__(self, optimizer, scores: Callable, label_smoothing: float = 0.0):
        self.optimizer, self.scores, self.label_smoothing = optimizer, scores, label_smoothing

    def forward(self, batch) -> dict[str, torch.Tensor]:
        logits, labels = self.scores(batch)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean()}

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()


class StopAfterSteps(Hook):
    """``max_steps`` > 0: the run ends after that many steps."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def after_step(self, loop: Loop) -> None:
        if self.max_steps and loop.step >= self.max_steps:
            loop.stop = True


# steps of linear warm-up before the cosine decay over the budget
WARMUP_STEPS = 50


def train_until_deadline(
    step: ClassifierStep,
    batches: Callable[[Loop], Iterable],
    budget: Budget,
    max_steps: int,
    log: Callable[[Loop], None],
    log_every: int,
) -> Loop:
    """Run ``step`` on ``batches`` until ``budget`` is spent or ``max_steps`` (0: none) are
    taken, with a warm-up of WARMUP_STEPS then a cosine decay to zero over the budget
    (:func:`~reslab.engine.schedules.warmup_cosine`); ``log(loop)`` every ``log_every``
    steps."""
    schedule = Schedule(
        step.optimizer, lambda loop: warmup_cosine(loop.step, WARMUP_STEPS, budget.used())
    )
    hooks = [StopAtDeadline(budget), schedule, StopAfterSteps(max_steps), Every(log, log_every)]
    # a budget of no minutes trains nothing
    return run(Loop(stop=not budget.limited), batches, step, hooks)


def deadline_record(loop: Loop, budget: Budget, crops: int) -> dict:
    """What :func:`train_until_deadline` did: steps, seconds since the budget started, the
    ``crops`` it drew from, and the last batch's loss and accuracy (NaN without a step)."""
    last = {name: value.item() for name, value in loop.losses.items()}
    return {
        "steps": loop.step,
        "seconds": budget.elapsed(),
        "crops": crops,
        "loss": last.get("loss", math.nan),
        "accuracy": last.get("accuracy", math.nan),
    }


def log_line(console: Console, name: str, budget: Budget) -> Callable[[Loop], None]:
    """The periodic line of a warm start, its name being the run's phase: ``{name} step N:
    loss=... accuracy=... (S steps/s, T left)``."""

    def log(loop: Loop) -> None:
        accuracy = loop.losses["accuracy"].item()
        elapsed = budget.elapsed()
        left = max(0.0, budget.minutes * 60 - elapsed)
        console.print(
            f"{name} step {loop.step}: loss={loop.loss:.4f} accuracy={accuracy:.3f} "
            f"({loop.step / max(elapsed, 1e-9):.2f} steps/s, {format_seconds(left)} left)"
        )

    return log


def crop_batches(
    crops: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    jitter: float,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """An epoch of (crops, boxes, labels) batches in a random order, each crop mirrored with
    its box at random and, with ``jitter`` > 0, its box's edges moved (:func:`jitter_boxes`)."""
    side = crops.shape[-1]
    for index in torch.randperm(len(labels), generator=generator).split(batch_size):
        x, box = crops[index], boxes[index].clone()
        mirror = torch.rand(len(index), generator=generator) < 0.5
        x[mirror] = x[mirror].flip(-1)
        box[mirror] = mirror_boxes(box[mirror], side)
        if jitter:
            box = jitter_boxes(box, jitter, side, generator)
        yield x, box, labels[index]


def pretrain_box_classifier(
    model,
    dataset: CocoDetection,
    minutes: float,
    batch_size: int = 64,
    lr: float = 0.2,
    side: int = CROP_SIDE,
    seed: int = 0,
    console: Console | None = None,
    max_steps: int = 0,
    jitter: float = 0.0,
    bf16: bool = False,
) -> dict:
    """Train the detector's trunk, res5 head and class scores on :func:`box_crops` at the
    detector's scale for ``minutes`` (the crops' making included), with SGD, a short warm-up, a
    cosine decay to zero over the budget and random mirroring; ``jitter`` > 0 moves each box's
    edges at random (:func:`jitter_boxes`) every time it is drawn; ``bf16`` runs the forward pass
    under bfloat16 autocast, as detection training's ``bf16``; ``max_steps`` (0: none) stops it
    sooner. Returns steps, seconds, crops and the last batch's loss and accuracy
    (training mode).

    The crops are at the detector's scale because detection's head sees each object at the
    size the resized image gives it, with its batch norm normalising over whole scenes: a crop
    that keeps that size, and the black canvas and neighbours around the object, teaches the
    head what detection then shows it.
    """
    console = console or Console()
    budget = Budget(minutes)
    crops, boxes, labels = detector_crops(model, dataset, side)
    console.print(f"pretraining the box classifier on {len(labels):,} ground-truth crops")
    heads = model.roi_heads
    parts = (model.backbone, heads.box_head, heads.box_predictor.cls_score)
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    generator = torch.Generator().manual_seed(seed)
    model.train()

    def scores(batch):
        x, box, batch_labels = batch
        with autocast("bf16" if bf16 else "fp32"):
            logits = crop_logits(model, x, box).float()
        return logits, batch_labels

    loop = train_until_deadline(
        ClassifierStep(optimizer, scores),
        lambda loop: crop_batches(crops, boxes, labels, batch_size, jitter, generator),
        budget,
        max_steps,
        log_line(console, "pretrain", budget),
        100,
    )
    record = deadline_record(loop, budget, len(labels))
    console.print(f"pretrained {record['steps']} steps in {record['seconds'] / 60:.1f} min")
    return record


WARM_START = "pretrained.pt"


def save_warm_start(model, out: str | Path, record: dict) -> Path:
    """The pretrained weights and the pretraining's record, for the ranks that train next."""
    path = Path(out) / WARM_START
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, {"state_dict": model.state_dict(), "pretrain": record})


def load_warm_start(model, out: str | Path) -> dict:
    """Load :func:`save_warm_start`'s weights into ``model``; the pretraining's record."""
    saved = torch.load(Path(out) / WARM_START, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"])
    return saved["pretrain"]
