"""Training data as batches of uint8 tensors, whatever the source.

A source yields ``(images uint8 (N, C, H, W), labels int64 (N,))``; the training loop turns
them into model input with :mod:`reslab.data.transforms`. The training order is a permutation
drawn from a generator the loop seeds from (seed, epoch), so any epoch's batches can be
rebuilt without replaying the ones before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from reslab.data import fashion_mnist

Batch = tuple[torch.Tensor, torch.Tensor]


class Source(Protocol):
    classes: tuple[str, ...]
    channels: int
    size: int  # side of the square uint8 images the source yields
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    train_size: int
    test_size: int

    def train_batches(
        self, batch_size: int, generator: torch.Generator | None, drop_last: bool = True
    ) -> Iterator[Batch]: ...

    def test_batches(self, batch_size: int) -> Iterator[Batch]: ...


def train_order(
    n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool = True
) -> list[torch.Tensor]:
    """Index batches for one epoch, in an order drawn from ``generator`` (None: the stored
    order). A short last batch is dropped when there are full ones (unless not ``drop_last``):
    batch norm statistics of a handful of images are noise."""
    perm = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


@dataclass
class TensorSource:
    """Fashion-MNIST held in memory (60,000 + 10,000 images, 55 MB as uint8)."""

    train_images: torch.Tensor  # (N, 1, 28, 28) uint8
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    description: str

    channels: int = 1
    size: int = 28

    def __post_init__(self) -> None:
        pixels = self.train_images.float().div_(255)
        self.mean = (pixels.mean().item(),)
        self.std = (max(pixels.std().item(), 1e-3),)
        self.train_size = len(self.train_labels)
        self.test_size = len(self.test_labels)

    def train_batches(
        self, batch_size: int, generator: torch.Generator | None, drop_last: bool = True
    ) -> Iterator[Batch]:
        for index in train_order(self.train_size, batch_size, generator, drop_last):
            yield self.train_images[index], self.train_labels[index]

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self.test_size, batch_size):
            end = start + batch_size
            yield self.test_images[start:end], self.test_labels[start:end]


def fashion_mnist_source(data_dir: str | None = None, verify: bool = True) -> TensorSource:
    train = fashion_mnist.load("train", data_dir, check_hash=verify)
    test = fashion_mnist.load("test", data_dir, check_hash=verify)
    unused = ""
    if data_dir is not None and train.source != Path(data_dir):
        # the installed copy comes first; a --data-dir typed in vain should not pass unseen
        unused = f"; --data-dir {data_dir} not used, the installed copy comes first"
    return TensorSource(
        train.images[:, None],
        train.labels,
        test.images[:, None],
        test.labels,
        classes=train.classes,
        description=f"Fashion-MNIST from {train.source} ({len(train):,} train, "
        f"{len(test):,} test images, in memory){unused}",
    )
