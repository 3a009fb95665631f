"""Fixtures shared across test folders."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import write_png

from reslab.data import fashion_mnist
from reslab.data.coco import CocoDetection

# The tests' models are tiny: one thread runs them faster than two, and on a shared 2-core
# machine two OpenMP threads per process spin against each other (measured 10x slower).
torch.set_num_threads(1)


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 28, 28) uint8 images whose class is a bright 7x7 square at one of ten places, plus
    noise: learnable within a few steps by the tiniest network."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 5)
        images[i, 3 + 12 * row : 10 + 12 * row, 1 + 5 * col : 6 + 5 * col] = 250
    return images, labels


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A folder with the four IDX files of a 40 + 20 image synthetic Fashion-MNIST; the system
    folder is pointed at a missing path so the real data set is never read."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-dir")
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, n, seed in (("train", 40, 0), ("test", 20, 1)):
        images, labels = synthetic_images(n, seed)
        fashion_mnist.write_idx(folder / f"{fashion_mnist.FILES[(split, 'images')][0]}.gz", images)
        fashion_mnist.write_idx(folder / fashion_mnist.FILES[(split, "labels")][0], labels)
    return folder


def _write_bars(root, count: int = 16, size: int = 64):
    """One white bar per black image: wide ones are class 1, tall ones class 2."""
    g = torch.Generator().manual_seed(0)
    images, annotations = [], []
    for i in range(count):
        label = 1 + i % 2
        w, h = (24, 8) if label == 1 else (8, 24)
        x, y = (int(v) for v in torch.randint(0, size - 24, (2,), generator=g))
        pixels = torch.zeros(3, size, size, dtype=torch.uint8)
        pixels[:, y : y + h, x : x + w] = 255
        write_png(pixels, str(root / f"{i}.png"))
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        annotations.append({"id": i + 1, "image_id": i, "category_id": label, "bbox": [x, y, w, h]})
    categories = [{"id": 1, "name": "wide"}, {"id": 2, "name": "tall"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "ann.json").write_text(json.dumps(data))
    return CocoDetection(root, root / "ann.json")


@pytest.fixture
def write_bars():
    """``write_bars(root, count=16, size=64)``: a COCO dataset of one white bar per black image,
    wide bars class 1 and tall ones class 2, written under ``root``."""
    return _write_bars
