"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest
import torch

from reslab.data import fashion_mnist

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
