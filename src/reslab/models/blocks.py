"""Residual, pre-activation and plain blocks with one constructor contract.

Every block is ``Block(in_channels, channels, stride, shortcut=...)`` and has an ``expansion``
attribute: the block outputs ``channels * expansion`` channels. Residual, pre-activation and
plain networks differ only in the block class handed to :class:`reslab.models.resnet.ResNet`.

Parameter names follow torchvision (``conv1``, ``bn1``, ..., ``downsample.0/1``) so that its
state dicts load unchanged.

Shortcut options are those of He et al. 2015 ("Deep Residual Learning"), section 3.3:

* ``"A"``: identity; when the shape changes, subsample by striding and zero-pad the new channels
  (no parameters; the paper's CIFAR-10 networks, section 4.2);
* ``"B"``: identity, with a 1x1 projection only where the shape changes (the default; what
  torchvision and most ImageNet models use);
* ``"C"``: a 1x1 projection on every block.

and one from He et al. 2019 ("Bag of Tricks for Image Classification", section 4.1, "ResNet-D"):

* ``"D"``: as B, but where the map shrinks the projection is a 2x2 average pool of stride 2
  followed by a 1x1 convolution of stride 1, so every input position reaches the sum (a 1x1
  convolution of stride 2 reads one position in four). Same multiply-adds as B plus the pool.

Any block takes ``se=R`` (default 0, off): squeeze-and-excitation (Hu et al. 2018, "SE-ResNet
module", figure 3) rescales each channel of the residual branch, before the addition, by a
gate computed from the branch's spatial means through a bottleneck of ``channels // R`` units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "C", "D")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: strided identity with zero-padded extra channels; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option A shortcut cannot reduce channels ({in_channels} -> {out_channels}); "
                "use shortcut='B' or 'C'"
            )
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            # zero channels on both sides, as in the paper's authors' CIFAR code
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.extra}"


def make_shortcut(
    in_channels: int, out_channels: int, stride: int, shortcut: str, norm: bool = True
) -> nn.Module | None:
    """The shortcut's module, or ``None`` for a plain identity."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {shortcut!r}; expected one of {SHORTCUTS}")
    changes_shape = stride != 1 or in_channels != out_channels
    if shortcut == "A":
        return PadShortcut(in_channels, out_channels, stride) if changes_shape else None
    if shortcut in ("B", "D") and not changes_shape:
        return None
    if shortcut == "D" and stride > 1:
        # ceil_mode and no padding count keep odd sides right: 7x7 -> 4x4, as the strided conv
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        layers = [pool, conv1x1(in_channels, out_channels)]
    else:
        layers = [conv1x1(in_channels, out_channels, stride)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel gates from global means: mean -> 1x1 down -> ReLU -> 1x1 up -> sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


def squeeze_excite(channels: int, se: int) -> nn.Module | None:
    """The branch's SE gate, or ``None`` when ``se`` is 0."""
    return SqueezeExcite(channels, se) if se else None


def residual_shortcut(block: nn.Module, *args, **kwargs) -> nn.Module | None:
    """The shortcut module of a residual block; plain blocks have none at all."""
    return make_shortcut(*args, **kwargs) if block.residual else None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; the sum passes through the last ReLU."""

    expansion = 1
    residual = True

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B", se: int = 0
    ):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.se = squeeze_excite(out_channels, se)
        self.downsample = residual_shortcut(self, in_channels, out_channels, stride, shortcut)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def last_norm(self) -> nn.BatchNorm2d:
        """The batch norm that ends the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.se is not None:
            out = self.se(out)
        if self.residual:
            # the shortcut takes the block's *input*; applying the projection to the branch's
            # output instead is the bug in the tutorial code this project started from
            # in place, as torchvision does: the batch norm before it does not need its output
            # for the backward pass, so this saves one activation-sized tensor per block
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with batch norm after each convolution.

    The stride sits on the 3x3 convolution (torchvision's "ResNet v1.5", about +0.5% top-1 on
    ImageNet for about 5% more multiply-adds, per NVIDIA's ResNet-50 v1.5 notes);
    ``stride_in_1x1=True`` puts it on the first 1x1 as in the original paper.
    """

    expansion = 4
    residual = True

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str = "B",
        stride_in_1x1: bool = False,
        se: int = 0,
    ):
        super().__init__()
        out_channels = channels * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_channels, channels, s1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels, s3)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.se = squeeze_excite(out_channels, se)
        self.downsample = residual_shortcut(self, in_channels, out_channels, stride, shortcut)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    forward = BasicBlock.forward


class PlainBasicBlock(BasicBlock):
    """BasicBlock with the same layers and no shortcut: the paper's "plain" network."""

    residual = False


class PlainBottleneck(Bottleneck):
    residual = False


class PreActBasicBlock(nn.Module):
    """Pre-activation block (He et al. 2016, "Identity Mappings"): BN-ReLU-conv, twice.

    Nothing follows the addition, so the shortcut path is a pure identity from block to block.
    A projection (or option A padding) takes the pre-activated input, as in the authors' code.
    """

    expansion = 1
    residual = True
    preact = True

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B", se: int = 0
    ):
        super().__init__()
        out_channels = channels * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, out_channels)
        self.relu = nn.ReLU()
        self.se = squeeze_excite(out_channels, se)
        self.downsample = residual_shortcut(
            self, in_channels, out_channels, stride, shortcut, norm=False
        )

    def branch(self, activated: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn2(self.conv1(activated))))

    def last_norm(self) -> None:
        return None  # the branch ends in a convolution; there is no norm to zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        out = self.branch(activated)
        if self.se is not None:
            out = self.se(out)
        if not self.residual:
            return out
        return out + (x if self.downsample is None else self.downsample(activated))


class PreActBottleneck(PreActBasicBlock):
    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str = "B",
        stride_in_1x1: bool = False,
        se: int = 0,
    ):
        nn.Module.__init__(self)
        out_channels = channels * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, channels, s1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels, s3)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3 = conv1x1(channels, out_channels)
        self.relu = nn.ReLU()
        self.se = squeeze_excite(out_channels, se)
        self.downsample = residual_shortcut(
            self, in_channels, out_channels, stride, shortcut, norm=False
        )

    def branch(self, activated: torch.Tensor) -> torch.Tensor:
        out = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.relu(self.bn3(out)))


BLOCKS: dict[str, type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "plain_basic": PlainBasicBlock,
    "plain_bottleneck": PlainBottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}
