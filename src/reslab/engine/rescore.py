"""A second opinion on each detection's class: a small image classifier that looks at the
detected box's own pixels, whose probability for the detection's label multiplies its score.

This is the decoupled classification refinement of Cheng et al. (2018, "Revisiting RCNN: On
Awakening the Classification Power of Faster RCNN"): a C4 detector classifies each RoI from the
shared stride-16 map, where a 25-58 pixel object of the Fashion-MNIST scenes covers a few cells,
so it finds objects more surely than it names them. A classifier on a window cut from the
image around the box sees the object at full resolution, alone. It trains on crops around the
ground-truth boxes, the edges moved at random as a proposal's would be, and is cheap: a
quarter-width ResNet-18 with the "small" stem on 28x28 windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torchvision.ops import box_convert, roi_align

from reslab.data.coco import CocoDetection
from reslab.engine.box_pretrain import (
    ClassifierStep,
    box_crops,
    deadline_record,
    jitter_boxes,
    log_line,
    train_until_deadline,
)
from reslab.engine.budget import Budget
from reslab.engine.checkpoint import save_checkpoint
from reslab.errors import ReslabError
from reslab.fast import autocast
from reslab.models import create_model

# the classifier: the default preset's Fashion-MNIST network, made for 28x28 inputs on a CPU
NETWORK = "resnet18"
NETWORK_KWARGS = {"stem": "small", "width": 0.25}
SIDE = 28  # the classifier's window, pixels a side
# the stored training crops: each box's longer side plus MARGIN of it on each side (room for
# the jittered boxes), at CROP_SIDE pixels
CROP_SIDE = 48
MARGIN = 0.3
SAVED = "rescorer.pt"


def squares(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy boxes -> the squares with the same centres whose side is each box's longer side."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) / 2
    return torch.cat([centre - half, centre + half], 1)


class Rescorer(nn.Module):
    """The classifier with its input normalisation: windows in [0, 1] -> class logits, the
    classes in the detector's order without the background (detector label L is class L - 1)."""

    def __init__(self, num_classes: int, mean, std):
        super().__init__()
        self.net = create_model(NETWORK, num_classes=num_classes, in_channels=3, **NETWORK_KWARGS)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = (windows - self.mean) / self.std
        return self.net(x.contiguous(memory_format=torch.channels_last))

    @property
    def num_classes(self) -> int:
        return self.net.fc.out_features

    def rescore(
        self, outputs: list[dict], images: list[torch.Tensor], bf16: bool = False
    ) -> list[dict]:
        """Each detection's score times this classifier's probability of its label, from its
        box's window of the image (``images`` in [0, 1], as the detector took them)."""
        p = probabilities(self, windows(images, [o["boxes"] for o in outputs]), bf16)
        labels = torch.cat([o["labels"] for o in outputs]) - 1
        agree = p[torch.arange(len(labels)), labels]
        parts = agree.split([len(o["labels"]) for o in outputs])
        return [
            {**output, "scores": output["scores"].float() * part}
            for output, part in zip(outputs, parts, strict=True)
        ]

    def rescore_results(
        self, results: list[dict], dataset: CocoDetection, bf16: bool = False
    ) -> list[dict]:
        """:meth:`rescore` for detections in COCO results format (as
        :func:`~reslab.engine.detect_infer.predict_dataset` gives them) on ``dataset``'s images,
        in the same order."""
        by_image: dict[int, list[int]] = {}
        for k, result in enumerate(results):
            by_image.setdefault(result["image_id"], []).append(k)
        rescored = list(results)
        for index, info in enumerate(dataset.images):
            picks = by_image.get(info["id"])
            if not picks:
                continue
            xywh = torch.tensor([results[k]["bbox"] for k in picks], dtype=torch.float32)
            output = {
                "boxes": box_convert(xywh, "xywh", "xyxy"),
                "labels": torch.tensor(
                    [dataset.label_of[results[k]["category_id"]] for k in picks]
                ),
                "scores": torch.tensor([results[k]["score"] for k in picks]),
            }
            image = dataset.load_image(index).float() / 255
            [output] = self.rescore([output], [image], bf16)
            for k, score in zip(picks, output["scores"].tolist(), strict=True):
                rescored[k] = {**results[k], "score": round(score, 5)}
        return rescored

    def payload(self, record: dict | None = None) -> dict:
        return {
            "num_classes": self.num_classes,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "state_dict": self.state_dict(),
            "record": record or {},
        }

    @classmethod
    def from_payload(cls, payload: dict) -> Rescorer:
        rescorer = cls(payload["num_classes"], payload["mean"], payload["std"])
        rescorer.load_state_dict(payload["state_dict"])
        return rescorer.eval()


def windows(images: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
    """The classifier's inputs: for each image (C, H, W) in [0, 1] and its xyxy boxes, the
    square around each box (:func:`squares`) resized to SIDE pixels; outside the image black.
    Grey images are repeated to three channels."""
    images = [
        image.float().expand(3, -1, -1) if image.shape[0] == 1 else image.float()
        for image in images
    ]
    out = [
        roi_align(image[None], [squares(b.float())], SIDE, aligned=True)
        for image, b in zip(images, boxes, strict=True)
    ]
    return torch.cat(out) if out else torch.zeros(0, 3, SIDE, SIDE)


@torch.no_grad()
def probabilities(rescorer: Rescorer, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Class probabilities of windows, averaged with their mirror images'."""
    rescorer.eval()
    chunks = []
    for part in x.split(512):
        with autocast("bf16" if bf16 else "fp32"):
            p = rescorer(part).float().softmax(1) + rescorer(part.flip(-1)).float().softmax(1)
        chunks.append(p / 2)
    return torch.cat(chunks) if chunks else torch.zeros(0, rescorer.num_classes)


def rescorer_accuracy(rescorer: Rescorer, dataset: CocoDetection, bf16: bool = False) -> float:
    """The share of ``dataset``'s ground-truth boxes whose window the rescorer names right."""
    right = total = 0
    for index, info in enumerate(dataset.images):
        anns = dataset.annotations[info["id"]]
        if not anns:
            continue
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        x = windows([dataset.load_image(index).float() / 255], [box_convert(xywh, "xywh", "xyxy")])
        labels = torch.tensor([dataset.label_of[a["category_id"]] - 1 for a in anns])
        right += int((probabilities(rescorer, x, bf16).argmax(1) == labels).sum())
        total += len(anns)
    return right / total if total else 0.0


def window_batches(
    crops: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    jitter: float,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (windows, labels) batches of crops drawn with replacement: each box's edges
    moved by up to ``jitter`` of its size, its window cut from the uint8 crop at SIDE pixels
    in [0, 1] and mirrored at random."""
    while True:
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        box = jitter_boxes(boxes[index], jitter, CROP_SIDE, generator)
        x = roi_align(crops[index].float() / 255, list(squares(box)[:, None]), SIDE, aligned=True)
        mirror = torch.rand(batch_size, generator=generator) < 0.5
        yield torch.where(mirror[:, None, None, None], x.flip(-1), x), labels[index]


def train_rescorer(
    dataset: CocoDetection,
    minutes: float,
    batch_size: int = 256,
    lr: float = 0.2,
    jitter: float = 0.1,
    seed: int = 0,
    bf16: bool = False,
    console: Console | None = None,
    max_steps: int = 0,
) -> tuple[Rescorer, dict]:
    """Train a :class:`Rescorer` on windows around the training boxes for ``minutes`` (the
    crops' making included): SGD with Nesterov momentum, a short warm-up and a cosine decay to
    zero over the budget, label smoothing 0.1, random mirroring, each box's edges moved by up
    to ``jitter`` of its size every time it is drawn. ``max_steps`` (0: none) stops it sooner.
    Returns the classifier and a record (steps, seconds, crops, last loss and accuracy)."""
    console = console or Console()
    budget = Budget(minutes)
    crops, boxes, labels = box_crops(dataset, CROP_SIDE, MARGIN)  # uint8, a batch is made float
    labels = labels - 1
    console.print(f"training the rescoring classifier on {len(labels):,} ground-truth crops")
    sample = crops[:: max(1, len(crops) // 2000)].float() / 255
    mean, std = sample.mean((0, 2, 3)), sample.std((0, 2, 3)).clamp(min=1e-3)
    torch.manual_seed(seed)
    rescorer = Rescorer(dataset.num_classes - 1, mean, std).train()
    optimizer = torch.optim.SGD(
        rescorer.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    generator = torch.Generator().manual_seed(seed)

    def scores(batch):
        x, batch_labels = batch
        with autocast("bf16" if bf16 else "fp32"):
            return rescorer(x).float(), batch_labels

    loop = train_until_deadline(
        ClassifierStep(optimizer, scores, label_smoothing=0.1),
        lambda loop: window_batches(crops, boxes, labels, batch_size, jitter, generator),
        budget,
        max_steps,
        log_line(console, "rescorer", budget),
        500,
    )
    record = deadline_record(loop, budget, len(labels))
    console.print(
        f"trained the rescorer for {record['steps']} steps in {record['seconds'] / 60:.1f} min"
    )
    return rescorer.eval(), record


def save_rescorer(rescorer: Rescorer, out: str | Path, record: dict) -> Path:
    """The trained rescorer, for the ranks that train the detector next to put in its
    checkpoints."""
    path = Path(out) / SAVED
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, rescorer.payload(record))


def load_rescorer_payload(out: str | Path) -> dict:
    return torch.load(Path(out) / SAVED, map_location="cpu", weights_only=True)


def rescorer_from_checkpoint(payload: dict) -> Rescorer | None:
    """The detector checkpoint's rescorer, or None when it was trained without one."""
    saved = payload.get("rescorer")
    if saved is None:
        return None
    try:
        return Rescorer.from_payload(saved)
    except (KeyError, RuntimeError) as error:
        raise ReslabError(
            f"the checkpoint's rescoring classifier does not load ({type(error).__name__}); "
            "evaluate without it with --no-rescore"
        ) from None
