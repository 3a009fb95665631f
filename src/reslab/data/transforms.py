"""Whole-batch transforms on tensors: the model's input format and training augmentation.

On 2 CPU cores a per-sample PIL pipeline costs more than the network (DESIGN.md, "Data"), so
augmentation draws one random number per sample and applies it to the whole batch with tensor
indexing. Every random draw comes from a ``torch.Generator`` the caller seeds, so a run's
augmentation is a function of (seed, epoch). The draws are made on the CPU and moved to the
batch's device, so a batch on a GPU is augmented exactly as the same batch on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class InputSpec:
    """How uint8 images become the model's input; stored in every checkpoint for `predict`."""

    size: int  # square side the model sees
    source_size: int  # side of the uint8 images the data source yields, before resizing
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    stem: str  # the model's stem, recorded for readers of the checkpoint
    # image files: shorter side resized to this, then a centre crop of source_size
    # (data.folders.centre_crop); 0 = the whole image squashed to source_size
    resize: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> InputSpec:
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def black(self) -> torch.Tensor:
        """(C,) what a black pixel (0) becomes in the model's input: the crop's padding."""
        return -torch.tensor(self.mean) / torch.tensor(self.std)


def to_input(images: torch.Tensor, spec: InputSpec, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W), or float on the same 0-255 scale -> normalised float
    (N, C, size, size)."""
    x = images.float().div_(255)
    if x.shape[-2:] != (spec.size, spec.size):
        # antialias only matters when shrinking; it matches PIL's resize there
        x = F.interpolate(
            x, size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def pad(x: torch.Tensor, padding: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """(N, C, H, W) with a border of ``padding`` pixels of ``fill`` (a value, or one per
    channel) on every side."""
    c = x.shape[1]
    padded = F.pad(x, (padding,) * 4)
    fill = torch.as_tensor(fill, dtype=x.dtype).to(x.device).expand(c).view(1, c, 1, 1)
    if fill.any():
        padded[:, :, :padding] = padded[:, :, -padding:] = fill
        padded[:, :, :, :padding] = padded[:, :, :, -padding:] = fill
    return padded


def shifted(x: torch.Tensor, pixels: int, fill: torch.Tensor | float = 0.0) -> list[torch.Tensor]:
    """The batch moved ``pixels`` right, left, down and up, the uncovered border filled with
    ``fill``: the test-time views of the training crop's translations."""
    h, w = x.shape[-2:]
    padded = pad(x, pixels, fill)
    p = pixels
    return [
        padded[..., p : p + h, :w],  # content moved right
        padded[..., p : p + h, 2 * p : 2 * p + w],  # left
        padded[..., :h, p : p + w],  # down
        padded[..., 2 * p : 2 * p + h, p : p + w],  # up
    ]


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Pad by ``padding`` with ``fill`` (a value, or one per channel) and cut a random window
    of the original size per sample."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = pad(x, padding, fill)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    index = (i.to(x.device) for i in (batch, chans, rows, cols))
    return padded[tuple(index)]  # (N, C, H, W)


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """One random window per image resized to ``size`` x ``size`` (Szegedy et al. 2015,
    "Going Deeper with Convolutions", section 6; torchvision's RandomResizedCrop): its area a
    uniform share ``scale`` of the image's, its aspect ratio log-uniform in ``ratio``. A side
    that would exceed the image is clipped to it, where torchvision draws again. All windows are
    cut by one bilinear ``grid_sample`` over the batch. uint8 or float (N, C, H, W) in, float
    (N, C, size, size) out, on the input's scale."""
    n, c = images.shape[:2]
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # the window's share of the width
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = w / 2 + torch.rand(n, generator=generator) * (1 - w)  # its centre, as a share
    cy = h / 2 + torch.rand(n, generator=generator) * (1 - h)
    theta = torch.zeros(n, 2, 3)  # output [-1, 1] -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    grid = F.affine_grid(theta.to(images.device), [n, c, size, size], align_corners=False)
    return F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(3), x)


def random_erasing(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Zero one rectangle per chosen sample (Zhong et al. 2017, "Random Erasing Data
    Augmentation"): area 2-33% of the image, aspect ratio 0.3-3.3, as in torchvision's
    RandomErasing. Applied after normalisation, so zero is the dataset mean."""
    if probability == 0:
        return x
    n, _, h, w = x.shape
    chosen = torch.rand(n, generator=generator) < probability
    area = torch.empty(n).uniform_(0.02, 0.33, generator=generator) * h * w
    log_ratio = torch.empty(n).uniform_(
        torch.log(torch.tensor(0.3)).item(),
        torch.log(torch.tensor(3.3)).item(),
        generator=generator,
    )
    ratio = log_ratio.exp()
    eh = (area * ratio).sqrt().round().clamp(1, h).long()
    ew = (area / ratio).sqrt().round().clamp(1, w).long()
    y0 = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    x0 = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    ys = torch.arange(h)[None, :]
    xs = torch.arange(w)[None, :]
    in_rows = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # (N, H)
    in_cols = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]  # (N, H, W)
    return x.masked_fill(mask[:, None].to(x.device), 0.0)


def augment(
    x: torch.Tensor,
    padding: int,
    erasing: float,
    generator: torch.Generator,
    fill: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """The training augmentation on a normalised float batch: crop (padded with ``fill``),
    flip, erase."""
    x = random_crop(x, padding, generator, fill)
    x = random_flip(x, generator)
    return random_erasing(x, erasing, generator)


def cutmix(
    x: torch.Tensor, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix on a batch (Yun et al. 2019, "CutMix"): with ``probability``, paste one box of a
    shuffled copy of the batch into every image. The box's area is a fraction 1 - lam of the
    image, lam ~ Beta(1, 1) = uniform, its centre uniform and its sides clipped to the image.
    Returns (images, the shuffled order, lam after clipping); the target is lam of each image's
    label plus 1 - lam of the pasted image's. Unmixed batches return lam = 1."""
    n, _, h, w = x.shape
    identity = torch.arange(n)
    if probability == 0 or torch.rand(1, generator=generator).item() >= probability:
        return x, identity, 1.0
    lam = torch.rand(1, generator=generator).item()
    order = torch.randperm(n, generator=generator)
    cut = (1 - lam) ** 0.5
    cy, cx = (torch.rand(2, generator=generator) * torch.tensor([h, w])).long().tolist()
    half_h, half_w = round(h * cut / 2), round(w * cut / 2)
    y0, y1 = max(cy - half_h, 0), min(cy + half_h, h)
    x0, x1 = max(cx - half_w, 0), min(cx + half_w, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[order.to(x.device), :, y0:y1, x0:x1]
    return mixed, order, 1 - (y1 - y0) * (x1 - x0) / (h * w)
