"""int8 post-training quantization of residual stages, for CPU inference.

A C4 detector spends nearly all of its inference time in one place: conv5_x run on every RoI
(1.62 TFLOP for ResNet-101 with 1000 RoIs). On CPUs with AVX512-VNNI or AVX-VNNI, int8
convolutions through PyTorch's x86 quantized engine run res5's shapes about four times as fast
as fp32 ones (benchmarks/results/kernels-20261126-044706.json, from `benchmarks/kernels.py`).

This is eager-mode static quantization (``torch.ao.quantization``): weights int8 per output
channel, activations uint8 per tensor, scales from observers that watch calibration inputs.
Each block becomes conv(+ReLU) modules and one fused add+ReLU, all on quantized tensors; the
batch norms must be folded first (:func:`reslab.fast.fold_batchnorm_`).

PyTorch 2.14 marks its quantized tensor types deprecated, to be removed in a later release in
favour of the separate torchao package; this project pins torch 2.14.1, where they work.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.ao.nn.intrinsic import ConvReLU2d
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

from reslab.errors import ReslabError
from reslab.fast import NORMS
from reslab.precision import cpu_flags

ENGINE = "x86"


def int8_pays() -> bool:
    """True where the CPU has VNNI (8-bit dot products): there int8 convolutions beat fp32."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def _conv(module: nn.Module) -> nn.Conv2d:
    """The convolution of a folded conv slot: a Conv2d, or Sequential(conv, Identity)."""
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, nn.Sequential):
        convs = [m for m in module if isinstance(m, nn.Conv2d)]
        rest = [m for m in module if not isinstance(m, nn.Conv2d | nn.Identity)]
        if len(convs) == 1 and not rest:
            return convs[0]
    raise ReslabError(
        f"cannot quantize {type(module).__name__}: only residual blocks with folded batch norm "
        "and 1x1 projection (option B/C) shortcuts are supported, not D's average pool"
    )


class Int8Block(nn.Module):
    """A folded BasicBlock or Bottleneck rebuilt for eager quantization.

    ``branch`` is conv+ReLU pairs and a last conv; the shortcut is the identity or a 1x1
    projection; ``add_relu`` adds them and applies the block's final ReLU in one quantized op.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        if not getattr(block, "residual", False) or any(
            isinstance(getattr(block, n, None), NORMS) for n in ("bn1", "bn2", "bn3")
        ):
            raise ReslabError(
                f"cannot quantize {type(block).__name__}: fold its batch norms first, and only "
                "post-activation residual blocks (basic or bottleneck) are supported"
            )
        if getattr(block, "se", None) is not None:
            raise ReslabError(
                f"cannot quantize {type(block).__name__} with squeeze-and-excitation (se): "
                "its channel gates have no int8 path here; quantize a model built with se=0"
            )
        convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        layers = [ConvReLU2d(_conv(c), nn.ReLU()) for c in convs[:-1]] + [_conv(convs[-1])]
        self.branch = nn.Sequential(*layers)
        self.shortcut = None if block.downsample is None else _conv(block.downsample)
        self.add_relu = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.add_relu.add_relu(self.branch(x), identity)


class Int8Stage(nn.Module):
    """A sequence of residual blocks taking and returning fp32 tensors, int8 inside."""

    def __init__(self, blocks: nn.Sequential):
        super().__init__()
        self.quant = QuantStub()
        self.blocks = nn.Sequential(*(Int8Block(b) for b in blocks))
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x.contiguous(memory_format=torch.channels_last))
        return self.dequant(self.blocks(x))


def quantize_stage(blocks: nn.Sequential, calibrate: Callable[[nn.Module], None]) -> Int8Stage:
    """An int8 copy of a folded stage of residual blocks.

    ``calibrate(stage)`` must run the observed stage on representative inputs (typically by
    putting it in place in the full model and running a few real images); the observers'
    ranges then fix every activation's scale. The original ``blocks`` are left untouched.
    """
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise ReslabError(f"this PyTorch build has no {ENGINE!r} quantized engine")
    torch.backends.quantized.engine = ENGINE
    stage = Int8Stage(copy.deepcopy(blocks)).eval()
    stage.qconfig = get_default_qconfig(ENGINE)
    with warnings.catch_warnings():  # eager-mode quantization warns of its future move
        warnings.simplefilter("ignore")
        prepare(stage, inplace=True)
        with torch.inference_mode():
            calibrate(stage)
        if not _observed(stage):
            raise ReslabError("calibration ran no data through the stage; give it some images")
        convert(stage, inplace=True)
    return stage


def _observed(stage: nn.Module) -> bool:
    observer = stage.quant.activation_post_process
    return bool(torch.isfinite(observer.min_val).all()) and observer.min_val.numel() > 0
