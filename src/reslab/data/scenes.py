"""Fashion-MNIST scenes: an offline detection dataset written in COCO format.

Each canvas holds 1-6 real Fashion-MNIST items, each scaled and placed at random; an item's box
is the tight box around its non-background pixels after scaling. Train scenes draw items from
the Fashion-MNIST training split and val scenes from its test split, so no item is in both.
The same seed writes byte-identical files.

Layout (what :mod:`reslab.data.coco` reads with ``--data DIR``)::

    DIR/train/000000.png ...    DIR/annotations/train.json
    DIR/val/000000.png ...      DIR/annotations/val.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import write_png

from reslab.data import fashion_mnist
from reslab.errors import ReslabError

# pixels at or below this (of 255) count as background when measuring an item's box
BACKGROUND = 16
SPLIT_SOURCES = {"train": "train", "val": "test"}  # scene split -> Fashion-MNIST split


@dataclass
class SceneConfig:
    images: int = 2000  # training canvases; val gets a fifth as many
    size: int = 128  # canvas side in pixels
    min_items: int = 1
    max_items: int = 6
    min_scale: float = 0.2  # item side as a fraction of the canvas side
    max_scale: float = 0.45
    max_overlap: float = 0.3  # largest IoU a new item may have with one already placed
    seed: int = 0


def _box_iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _tight_box(item: torch.Tensor) -> list[int] | None:
    """(x0, y0, x1, y1) around the pixels above BACKGROUND, in pixel-edge coordinates."""
    ys, xs = torch.nonzero(item > BACKGROUND, as_tuple=True)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def render_scene(
    items: torch.Tensor, labels: torch.Tensor, config: SceneConfig, generator: torch.Generator
) -> tuple[torch.Tensor, list[tuple[list[int], int]]]:
    """One canvas (size, size) uint8 and its [(box xyxy, Fashion-MNIST label)] list."""
    size = config.size
    canvas = torch.zeros(size, size, dtype=torch.uint8)
    count = int(torch.randint(config.min_items, config.max_items + 1, (1,), generator=generator))
    objects: list[tuple[list[int], int]] = []
    for _ in range(count):
        for _attempt in range(20):  # give up on an item that finds no free place
            index = int(torch.randint(len(items), (1,), generator=generator))
            scale = config.min_scale + (config.max_scale - config.min_scale) * float(
                torch.rand((), generator=generator)
            )
            side = max(8, round(scale * size))
            item = (
                F.interpolate(
                    items[index][None, None].float(),
                    size=(side, side),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[0, 0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
            box = _tight_box(item)
            if box is None:
                break
            x = int(torch.randint(size - side + 1, (1,), generator=generator))
            y = int(torch.randint(size - side + 1, (1,), generator=generator))
            placed = [box[0] + x, box[1] + y, box[2] + x, box[3] + y]
            if all(_box_iou(placed, other) <= config.max_overlap for other, _ in objects):
                region = canvas[y : y + side, x : x + side]
                torch.maximum(region, item, out=region)  # items are light on black
                objects.append((placed, int(labels[index])))
                break
    return canvas, objects


def coco_categories() -> list[dict]:
    # COCO ids start at 1; torchvision's detectors keep label 0 for the background
    return [{"id": i + 1, "name": name} for i, name in enumerate(fashion_mnist.CLASSES)]


def write_split(
    out: Path, split: str, count: int, config: SceneConfig, source: fashion_mnist.Split
) -> Path:
    # one stream per split, so the val set does not change when --images changes
    generator = torch.Generator().manual_seed(config.seed * 1000 + list(SPLIT_SOURCES).index(split))
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(count):
        canvas, objects = render_scene(source.images, source.labels, config, generator)
        name = f"{image_id:06d}.png"
        write_png(canvas[None], str(image_dir / name), compression_level=6)
        images.append(
            {"id": image_id, "file_name": name, "width": config.size, "height": config.size}
        )
        for box, label in objects:
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    path = out / "annotations" / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = {
        "info": {"description": "Fashion-MNIST scenes (reslab)", "config": asdict(config)},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    path.write_text(json.dumps(dataset, indent=1))
    return path


def check_scene_config(config: SceneConfig) -> None:
    """One error naming the first setting out of range (by its flag where it has one)."""
    checks = (
        (config.images >= 1, f"--images must be at least 1, got {config.images}"),
        (config.size >= 32, f"--size must be at least 32 pixels, got {config.size}"),
        (config.min_items >= 1, f"min_items must be at least 1, got {config.min_items}"),
        (
            config.max_items >= config.min_items,
            f"--max-items must be at least {config.min_items} (the fewest items per canvas), "
            f"got {config.max_items}",
        ),
        (
            0 < config.min_scale <= config.max_scale <= 1,
            f"item scales need 0 < min_scale <= max_scale <= 1, got {config.min_scale:g} and "
            f"{config.max_scale:g}",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ReslabError(message)


def make_scenes(out: str | Path, config: SceneConfig, data_dir: str | Path | None = None) -> dict:
    """Write train and val scenes under ``out``; returns {split: annotation file}."""
    check_scene_config(config)
    out = Path(out)
    counts = {"train": config.images, "val": max(1, config.images // 5)}
    return {
        split: write_split(
            out, split, counts[split], config, fashion_mnist.load(SPLIT_SOURCES[split], data_dir)
        )
        for split in SPLIT_SOURCES
    }
