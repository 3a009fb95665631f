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

Any residual block but a pre-activation one takes ``merge=`` (default ``"add"``), how the
shortcut and the branch meet; the other merges are the shortcut variants of He et al. 2016
("Identity Mappings in Deep Residual Networks", section 3.1, Figure 2), all of which the paper
finds worse than the plain sum:

* ``"scale"``: both scaled by 0.5, ``0.5 * (shortcut + branch)`` (Figure 2b);
* ``"exclusive_gate"``: ``(1 - g) * shortcut + g * branch`` with ``g = sigmoid(W x + b)``, a 1x1
  convolution of the block's input, ``b`` starting at -6 (Figure 2c);
* ``"shortcut_gate"``: ``(1 - g) * shortcut + branch`` (Figure 2d);
* ``"dropout"``: dropout of ratio 0.5 on the shortcut during training (Figure 2f).

Figure 2e, a 1x1 convolution on every shortcut, is option ``"C"``. The activation orderings of
the same paper (section 4.1, Figure 4) are block classes of their own, in :data:`ORDERINGS`.
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


class ConstantScale(nn.Module):
    """``scale * (shortcut + branch)``: at scale 1 the plain sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, scale: float = 0.5):
        super().__init__()
        self.scale = scale

    def forward(self, branch, shortcut, x):
        return self.scale * (shortcut + branch)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class ExclusiveGate(nn.Module):
    """``(1 - g) * shortcut + g * branch``, the gate ``g`` a 1x1 convolution of the block input
    through a sigmoid, per channel and position; the bias starts at ``bias`` (the paper's best,
    -6, keeps the gate near 0 and the block near its shortcut at first)."""

    gates_branch = True

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: float = -6.0):
        super().__init__()
        self.gate = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
        nn.init.constant_(self.gate.bias, bias)

    def forward(self, branch, shortcut, x):
        g = torch.sigmoid(self.gate(x))
        return (1 - g) * shortcut + (g * branch if self.gates_branch else branch)


class ShortcutGate(ExclusiveGate):
    """``(1 - g) * shortcut + branch``: the gate on the shortcut alone."""

    gates_branch = False


class DropoutShortcut(nn.Module):
    """``dropout(shortcut) + branch``, ratio ``p`` (kept values scaled by ``1 / (1 - p)`` in
    training, as ``torch.nn.functional.dropout`` does; the plain sum in evaluation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, branch, shortcut, x):
        return F.dropout(shortcut, self.p, self.training) + branch


# how the shortcut meets the branch; "add" (None: the in-place sum) is the paper's identity
MERGES: dict[str, type[nn.Module] | None] = {
    "add": None,
    "scale": ConstantScale,
    "exclusive_gate": ExclusiveGate,
    "shortcut_gate": ShortcutGate,
    "dropout": DropoutShortcut,
}


def make_merge(merge: str, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; expected one of {tuple(MERGES)}")
    kind = MERGES[merge]
    return None if kind is None else kind(in_channels, out_channels, stride)


def residual_shortcut(block: nn.Module, *args, **kwargs) -> nn.Module | None:
    """The shortcut module of a residual block; plain blocks have none at all."""
    return make_shortcut(*args, **kwargs) if block.residual else None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; the sum passes through the last ReLU."""

    expansion = 1
    residual = True

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        shortcut: str = "B",
        se: int = 0,
        merge: str = "add",
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
        self.merge = make_merge(merge, in_channels, out_channels, stride) if self.residual else None

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
            shortcut = x if self.downsample is None else self.downsample(x)
            if self.merge is None:
                # in place, as torchvision does: the batch norm before it does not need its
                # output for the backward pass, so this saves one activation-sized tensor
                out += shortcut
            else:
                out = self.merge(out, shortcut, x)
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
        merge: str = "add",
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
        self.merge = make_merge(merge, in_channels, out_channels, stride) if self.residual else None

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


class BNAfterAddBlock(BasicBlock):
    """He et al. 2016, Figure 4b: conv-BN-ReLU-conv, add, then BN and ReLU on the sum. The
    batch norm sits on the shortcut path, which is no longer an identity."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B"):
        super().__init__(in_channels, channels, stride, shortcut)
        # named bn_out, not bn2: it follows the addition, so folding it into conv2 is wrong
        self.bn_out, self.bn2 = self.bn2, None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn1(self.conv1(x))))

    def last_norm(self) -> None:
        return None  # zeroing the norm after the addition would silence the shortcut too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn_out(self.branch(x) + shortcut))


class ReLUBeforeAddBlock(BasicBlock):
    """He et al. 2016, Figure 4c: the branch ends in its own ReLU, then the sum, and nothing
    after it; the branch can only add, never subtract."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.branch(x)) + shortcut


class ReLUPreActBlock(BasicBlock):
    """He et al. 2016, Figure 4d: ReLU-conv-BN-ReLU-conv-BN, then the sum, nothing after it;
    the ReLU moves before the convolutions, the batch norms stay after them."""

    needs_final_norm = True  # the last unit ends with a sum: the network adds BN-ReLU after it

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return super().branch(torch.relu(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.branch(x) + shortcut


# He et al. 2016, Figure 4: where batch norm and ReLU sit around the addition, (a) to (e)
ORDERINGS: dict[str, type[nn.Module]] = {
    "original": BasicBlock,
    "bn_after_add": BNAfterAddBlock,
    "relu_before_add": ReLUBeforeAddBlock,
    "relu_preact": ReLUPreActBlock,
    "full_preact": PreActBasicBlock,
}

BLOCKS: dict[str, type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "plain_basic": PlainBasicBlock,
    "plain_bottleneck": PlainBottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}
