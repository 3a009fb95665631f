"""CPU fast paths: channels_last, bf16 autocast, folded batch norm.

Training keeps every parameter, batch-norm statistic and the loss in fp32: autocast only runs
convolutions and matrix products in bf16 (PyTorch's CPU autocast op lists), and callers compute
the loss on ``logits.float()``. Inference folds each batch norm that follows a convolution into
that convolution's weights and bias (Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", section 3.2), which removes a full
read and write of every activation per folded layer.

Typical use::

    model, precision = fast.prepare_for_training(model, "bf16")
    with fast.autocast(precision):
        logits = model(fast.to_input(images))
    loss = F.cross_entropy(logits.float(), labels)

    predictor = fast.prepare_for_inference(model)              # fp32 in, fp32 out

Both take ``precision="auto"`` too, resolved by :func:`reslab.precision.resolve_precision`
with a forward pass timed in each precision.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from reslab.models.blocks import Bottleneck, PreActBasicBlock, PreActBottleneck
from reslab.precision import bf16_supported as bf16_supported  # re-exported for older imports
from reslab.precision import resolve_precision, time_forward

log = logging.getLogger("reslab")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (convolution, the batch norm that directly follows it) per block class; looked up along the
# class's MRO, so the plain twins (subclasses) share their residual parents' pairs. In a
# pre-activation block bn1 precedes conv1 with a ReLU between them and cannot be folded; bn2
# (and bn3) follow conv1 (and conv2) directly and fold into them.
FOLDABLE_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    PreActBottleneck: (("conv1", "bn2"), ("conv2", "bn3")),
    PreActBasicBlock: (("conv1", "bn2"),),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}
# BasicBlock, and the network stem (conv1, bn1): any other module with a conv1/bn1 pair.
DEFAULT_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))
NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def autocast(precision: str, device: torch.device | str = "cpu") -> torch.autocast:
    """bf16 autocast on ``device``'s kind (cpu or cuda) for ``"bf16"``; off for ``"fp32"``.
    The one autocast of training, evaluation, detection and the benchmarks."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_input(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """A batch in the layout the prepared model expects (channels_last: NHWC in memory)."""
    return x.contiguous(memory_format=memory_format(channels_last))


def example_batch(model: nn.Module, batch: int = 32) -> torch.Tensor:
    """A random batch to time ``model`` on: its first convolution's channels, 28x28 for one
    channel (Fashion-MNIST), else 64x64 (an image folder's default size)."""
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    side = 28 if channels == 1 else 64
    return torch.randn(batch, channels, side, side)


def _autocast_call(model: nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        with autocast(precision):
            return model(x)

    return call


def prepare_for_training(
    model: nn.Module,
    precision: str = "auto",
    channels_last: bool = True,
    compile: bool = False,
    example: torch.Tensor | None = None,
) -> tuple[nn.Module, str]:
    """(model ready to train, resolved precision) for use with :func:`autocast`.

    "auto" times an eval-mode forward pass of a copy on ``example`` (default
    :func:`example_batch`) in each precision (:func:`reslab.precision.resolve_precision`).

    Changes ``model``'s memory format in place (build the optimizer after, or before: the
    parameters are the same objects).

    The parameters stay fp32 (autocast casts per operation, so the optimizer and batch norm
    statistics see fp32). channels_last lets oneDNN run convolutions without reordering each
    activation to its blocked layout and back. ``compile`` wraps the model in ``torch.compile``
    (inductor); the first steps then take minutes on a small CPU.
    """
    if precision == "auto":
        probe = copy.deepcopy(model).eval().to(memory_format=memory_format(channels_last))
        x = to_input(example if example is not None else example_batch(model), channels_last)
        precision, _ = resolve_precision(
            "auto", measure=lambda p: time_forward(_autocast_call(probe, p), x), say=log.info
        )
    else:
        precision, _ = resolve_precision(precision)
    model = model.to(memory_format=memory_format(channels_last))
    if compile:
        model = torch.compile(model)
    return model, precision


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> bool:
    conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(norm, NORMS):
        return False
    weight, bias = fuse_conv_bn_weights(
        conv.weight,
        conv.bias,
        norm.running_mean,
        norm.running_var,
        norm.eps,
        norm.weight,
        norm.bias,
    )
    folded = copy.deepcopy(conv)
    folded.weight, folded.bias = weight, bias
    setattr(parent, conv_name, folded)
    setattr(parent, norm_name, nn.Identity())
    return True


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every batch norm that follows a conv folded in.

    Covers the stem, every block type (residual, plain, pre-activation) and projection
    shortcuts (``downsample = Sequential(conv, bn)``). Batch norms that precede a ReLU and a
    convolution (pre-activation ``bn1``, ``final_norm``) stay: a ReLU between them makes the
    folding inexact. Outputs match the original model's eval outputs within float rounding.
    """
    return fold_batchnorm_(copy.deepcopy(model).eval())


def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """:func:`fold_batchnorm` in place, for models too large to copy (a detector); returns
    ``model``. Only valid for inference: put the model in eval mode (or use frozen batch norm),
    since a folded network can no longer normalise with batch statistics."""
    for module in list(model.modules()):
        pairs = next(
            (FOLDABLE_PAIRS[cls] for cls in type(module).__mro__ if cls in FOLDABLE_PAIRS),
            DEFAULT_PAIRS,
        )
        for conv_name, norm_name in pairs:
            _fold_pair(module, conv_name, norm_name)
        if isinstance(module, nn.Sequential) and len(module) >= 2:
            for index in range(len(module) - 1):
                _fold_pair(module, str(index), str(index + 1))
    return model


class InferenceModel(nn.Module):
    """A prepared classifier: takes fp32 NCHW batches, returns fp32 logits.

    Inside, the input is moved to the model's layout and precision; ``spec`` is carried over so
    the prepared model still describes itself.
    """

    def __init__(self, model: nn.Module, precision: str, channels_last: bool):
        super().__init__()
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self.spec = getattr(model, "spec", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=DTYPES[self.precision], memory_format=memory_format(self.channels_last))
        return self.model(x).float()


def prepare_for_inference(
    model: nn.Module,
    precision: str = "auto",
    fold_bn: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    example: torch.Tensor | None = None,
) -> InferenceModel:
    """A frozen, eval-mode copy of ``model`` for fast prediction (fp32 in, fp32 out).

    bf16 stores the weights in bf16 (no per-call casts). "auto" times the prepared model on
    ``example`` (default :func:`example_batch`) in each precision and logs its choice on the
    "reslab" logger at INFO level, so that prediction's output stays its results.
    ``compile`` adds ``torch.compile`` (inductor) with freezing: the weights become constants,
    so inductor folds them and packs each convolution's weights once, in oneDNN's blocked
    layout, instead of reordering them on every call. Shapes are static (``dynamic=False``):
    each new batch size compiles once, and no call runs a slower shape-generic kernel. The
    first call takes seconds to minutes; worth it for long prediction runs only.
    """
    if precision == "auto":
        x = example if example is not None else example_batch(model)

        def measure(p: str) -> float:
            return time_forward(_inference_model(model, p, fold_bn, channels_last), x)

        precision, _ = resolve_precision("auto", measure=measure, say=log.info)
    else:
        precision, _ = resolve_precision(precision)
    model = _inference_model(model, precision, fold_bn, channels_last)
    if compile:
        model.model = torch.compile(model.model, dynamic=False, options={"freezing": True})
    return model


def _inference_model(
    model: nn.Module, precision: str, fold_bn: bool, channels_last: bool
) -> InferenceModel:
    spec = getattr(model, "spec", None)
    model = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    model.requires_grad_(False)
    model = model.to(dtype=DTYPES[precision], memory_format=memory_format(channels_last))
    if spec is not None:
        model.spec = spec
    return InferenceModel(model, precision, channels_last).eval()
