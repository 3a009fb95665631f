"""The ResNet family as data: one network class, depth tables, and a registry.

ImageNet depths follow He et al. 2015, Table 1; CIFAR depths (6n+2) follow section 4.2;
pre-activation variants follow He et al. 2016. Module names match torchvision's
(``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``) so its state dicts load unchanged.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.models.blocks import BLOCKS, MERGES, ORDERINGS, SHORTCUTS

# (kernel, stride, padding of conv1; whether a 3x3/2 max pool follows)
STEMS: dict[str, tuple[int, int, int, bool]] = {
    "imagenet": (7, 2, 3, True),  # 224 -> 56 at stage 1 (paper Table 1)
    "cifar": (3, 1, 1, False),  # 32 -> 32 at stage 1 (paper section 4.2)
    # 28 -> 14 at stage 1: a 3x3 conv keeps the detail of small images that a 7x7/2 conv plus
    # pool (28 -> 7) would throw away, at a quarter of the cost of the "cifar" stem.
    "small": (3, 1, 1, True),
}

# depth -> (block kind, blocks per stage); He et al. 2015, Table 1
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# 6n+2 layers: three stages of n basic blocks at widths 16/32/64; section 4.2
CIFAR_DEPTHS: dict[int, int] = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18, 1202: 200}

FAMILIES = {"": "", "preact_": "preact_", "plain_": "plain_"}  # name prefix -> block prefix


def check_se(se) -> int:
    """``se`` itself, if it is a squeeze-and-excitation reduction ratio (0 = off)."""
    if isinstance(se, bool) or not isinstance(se, int) or se < 0:
        raise ReslabError(
            f"se (--se) must be a whole reduction ratio such as 4 or 16, or 0 for off; got {se!r}"
        )
    return se


def _block_options(block, shortcut: str, stride_in_1x1: bool, se: int, merge: str) -> dict:
    """The keyword arguments every block of a network gets; only those set are passed, so a
    block class that lacks an option is never handed it."""
    options = {"shortcut": shortcut}
    if stride_in_1x1:
        if block.expansion == 1:
            raise ReslabError("stride_in_1x1 applies to bottleneck blocks only")
        options["stride_in_1x1"] = True
    if check_se(se):
        options["se"] = se
    if merge != "add":
        if merge not in MERGES:
            raise ReslabError(f"unknown merge {merge!r}; expected one of {tuple(MERGES)}")
        if block not in (BLOCKS["basic"], BLOCKS["bottleneck"]):
            raise ReslabError(f"merge {merge!r} needs residual basic or bottleneck blocks")
        options["merge"] = merge
    return options


class ResNet(nn.Module):
    """Stem, stages of residual blocks, global average pooling and a linear classifier."""

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        shortcut: str = "B",
        width: float = 1.0,
        zero_init_residual: bool = False,
        stride_in_1x1: bool = False,
        se: int = 0,
        merge: str = "add",
    ):
        super().__init__()
        if stem not in STEMS:
            raise ReslabError(f"unknown stem {stem!r}; expected one of {sorted(STEMS)}")
        if shortcut not in SHORTCUTS:
            raise ReslabError(f"unknown shortcut {shortcut!r}; expected one of {SHORTCUTS}")
        if len(layers) != len(widths):
            raise ReslabError(f"{len(layers)} stages but {len(widths)} widths")
        if not math.isfinite(width) or width <= 0:
            raise ReslabError(f"width multiplier must be a positive number, got {width}")
        if zero_init_residual and not block.residual:
            # a plain block's last batch norm feeds the ReLU alone: at zero it outputs zero and
            # passes back no gradient, so the network could never train
            raise ReslabError(
                "zero_init_residual needs residual blocks; a plain network would start dead"
            )
        block_options = _block_options(block, shortcut, stride_in_1x1, se, merge)
        widths = [max(1, round(w * width)) for w in widths]
        preact = getattr(block, "preact", False)
        kernel, stride, padding, pool = STEMS[stem]

        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel, stride, padding, bias=False)
        # A pre-activation network without a pool feeds conv1 straight into the first unit,
        # whose own BN-ReLU is "the first activation right after conv1" (He et al. 2016, 4.1).
        stem_norm = not preact or pool
        self.bn1 = nn.BatchNorm2d(widths[0]) if stem_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if stem_norm else nn.Identity()
        self.maxpool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()

        channels = widths[0]
        self.stage_names = []
        for index, (repeats, stage_width) in enumerate(zip(layers, widths, strict=True)):
            stage_stride = 1 if index == 0 else 2
            blocks = []
            for b in range(repeats):
                blocks.append(
                    block(channels, stage_width, stage_stride if b == 0 else 1, **block_options)
                )
                channels = stage_width * block.expansion
            name = f"layer{index + 1}"
            setattr(self, name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        # pre-activation units end with an addition; the network then needs one last BN-ReLU
        self.final_norm = (
            nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            if preact or getattr(block, "needs_final_norm", False)
            else nn.Identity()
        )
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He initialisation (He et al. 2015b) in fan-out mode, as torchvision does.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # each block starts as the identity (Goyal et al. 2017, "Accurate, large minibatch
            # SGD", section 5.1)
            for m in self.modules():
                norm = m.last_norm() if hasattr(m, "last_norm") else None
                if norm is not None:
                    nn.init.zeros_(norm.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_norm(x)  # (N, num_features, H/32, W/32) with the imagenet stem

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _registry() -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for prefix, block_prefix in FAMILIES.items():
        for depth, (kind, layers) in IMAGENET_DEPTHS.items():
            entries[f"{prefix}resnet{depth}"] = dict(
                block=block_prefix + kind,
                layers=layers,
                widths=(64, 128, 256, 512),
                stem="imagenet",
                shortcut="B",
                num_classes=1000,
            )
        for depth, n in CIFAR_DEPTHS.items():
            entries[f"{prefix}resnet{depth}"] = dict(
                block=block_prefix + "basic",
                layers=(n, n, n),
                widths=(16, 32, 64),
                stem="cifar",
                shortcut="A",
                num_classes=10,
            )
    return entries


MODELS = _registry()


def list_models() -> list[str]:
    return list(MODELS)


def _check_name(name: str) -> None:
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ReslabError(f"unknown model {name!r}{hint} (`reslab models` lists all {len(MODELS)})")


def model_defaults(name: str) -> dict:
    """The registry's constructor arguments for ``name`` (block given by its name)."""
    _check_name(name)
    return dict(MODELS[name])


def create_model(name: str, **kwargs) -> ResNet:
    """Build a registered model; ``kwargs`` override the registry's constructor arguments.

    The returned model carries ``model.spec = {"name": ..., "kwargs": ...}``, enough to rebuild
    it (checkpoints and exported files store it).
    """
    args = model_defaults(name)
    unknown = set(kwargs) - _ACCEPTED
    if unknown:
        raise ReslabError(
            f"create_model({name!r}) got unknown argument(s) {sorted(unknown)}; "
            f"accepted: {sorted(_ACCEPTED)}"
        )
    args.update(kwargs)
    args["block"] = _block_class(name, args["block"], args.pop("ordering", "original"))
    model = ResNet(**args)
    model.spec = {"name": name, "kwargs": dict(kwargs)}
    return model


def _block_class(name: str, kind: str, ordering: str) -> type[nn.Module]:
    """The block class of ``kind``; an ``ordering`` other than ``"original"`` swaps a residual
    basic block for one of He et al. 2016's activation orderings (Figure 4)."""
    if ordering == "original":
        return BLOCKS[kind]
    if ordering not in ORDERINGS:
        raise ReslabError(f"unknown ordering {ordering!r}; expected one of {tuple(ORDERINGS)}")
    if kind != "basic":
        raise ReslabError(
            f"ordering {ordering!r} applies to residual basic-block networks, not {name}"
        )
    return ORDERINGS[ordering]


_ACCEPTED = {
    "merge",
    "ordering",
    "num_classes",
    "in_channels",
    "stem",
    "shortcut",
    "width",
    "zero_init_residual",
    "stride_in_1x1",
    "widths",
    "se",
}
