"""Architecture tables in the manner of He et al. 2015, Table 1.

Multiply-adds are counted by ``torch.utils.flop_counter.FlopCounterMode`` (which reports FLOPs,
two per multiply-add, for convolutions and matrix products; batch norm, ReLU and pooling are
not counted, as in the paper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reslab.errors import ReslabError
from reslab.models.blocks import BasicBlock, Bottleneck
from reslab.models.resnet import IMAGENET_DEPTHS, ResNet, create_model

# He et al. 2015, Table 1, "FLOPs" row (multiply-adds, x10^9, 224x224 input)
PAPER_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


@dataclass
class StageRow:
    name: str
    output_shape: tuple[int, ...]  # (C, H, W)
    blocks: int
    params: int
    macs: int


@dataclass
class ModelSummary:
    name: str
    input_shape: tuple[int, ...]
    rows: list[StageRow]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "rows": [asdict(r) for r in self.rows],
            "params": self.params,
            "macs": self.macs,
        }


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(multiply-adds, output) of one forward call."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = module(*inputs)
    return counter.get_total_flops() // 2, out


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def summarize(model: ResNet, input_shape: tuple[int, int, int], name: str = "") -> ModelSummary:
    """Per-stage output shape, block count, parameters and multiply-adds for one image."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ReslabError(f"input shape must be C,H,W with positive sizes, got {input_shape}")
    expected = model.conv1.in_channels
    if input_shape[0] != expected:
        raise ReslabError(f"the model takes {expected} input channel(s), got {input_shape[0]}")
    model = model.eval()
    # a model built on the meta device is counted without computing anything
    x = torch.zeros(1, *input_shape, device=model.conv1.weight.device)
    stem_modules = (model.conv1, model.bn1, model.relu, model.maxpool)
    macs, x = count_macs(model.forward_stem, x)
    rows = [StageRow("stem", tuple(x.shape[1:]), 0, _params(*stem_modules), macs)]
    for stage_name, stage in zip(model.stage_names, model.stages, strict=True):
        macs, x = count_macs(stage, x)
        rows.append(StageRow(stage_name, tuple(x.shape[1:]), len(stage), _params(stage), macs))
    macs, logits = count_macs(lambda t: model.forward_head(model.final_norm(t)), x)
    rows.append(
        StageRow("head", tuple(logits.shape[1:]), 0, _params(model.final_norm, model.fc), macs)
    )
    return ModelSummary(name or model.spec.get("name", "model"), tuple(input_shape), rows)


def summarize_name(name: str, input_shape: tuple[int, int, int] = (3, 224, 224), **kwargs):
    """Summary of a registry model, built on the meta device: shapes and counts, no compute."""
    with torch.device("meta"):
        model = create_model(name, in_channels=input_shape[0], **kwargs)
    return summarize(model, input_shape, name)


def paper_comparison(depth: int) -> dict:
    """ResNet-``depth`` at 224x224: paper's multiply-adds vs v1 and v1.5 stride placement."""
    if depth not in PAPER_GMACS:
        raise ReslabError(f"the paper's Table 1 has depths {sorted(PAPER_GMACS)}, not {depth}")
    name = f"resnet{depth}"
    v15 = summarize_name(name).macs
    bottleneck = IMAGENET_DEPTHS[depth][0] == "bottleneck"
    v1 = summarize_name(name, stride_in_1x1=True).macs if bottleneck else v15
    paper = PAPER_GMACS[depth] * 1e9
    return {
        "depth": depth,
        "paper_macs": paper,
        "v1_macs": v1,
        "v1_5_macs": v15,
        "v1_vs_paper": v1 / paper - 1,
        "v1_5_cost": v15 / v1 - 1,
    }


def block_arithmetic(kind: str, channels: int = 256, size: int = 56) -> dict:
    """Weights and multiply-adds of one block that maps ``channels`` to ``channels``.

    ``kind`` is ``"basic"`` (two 3x3 convs at ``channels``) or ``"bottleneck"`` (1x1 down to
    ``channels // 4``, 3x3, 1x1 back up), both at ``size`` x ``size``.
    """
    if channels < 4 or channels % 4:
        raise ReslabError(f"channels must be a positive multiple of 4, got {channels}")
    if kind == "basic":
        block = BasicBlock(channels, channels)
    elif kind == "bottleneck":
        block = Bottleneck(channels, channels // Bottleneck.expansion)
    else:
        raise ReslabError(f"unknown block kind {kind!r}; expected 'basic' or 'bottleneck'")
    conv_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    macs, _ = count_macs(block.eval(), torch.zeros(1, channels, size, size))
    return {
        "kind": kind,
        "channels": channels,
        "size": size,
        "conv_weights": conv_weights,
        "params": _params(block),
        "macs": macs,
    }
