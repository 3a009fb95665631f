"""int8 residual stages (the detector's int8 head: tests/models/test_detection.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

from reslab.errors import ReslabError
from reslab.fast import fold_batchnorm
from reslab.models import create_model
from reslab.quantize import Int8Stage, quantize_stage


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms far from identity, so that folding and quantizing have something to keep."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=g) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=g) * 1.5 + 0.5)
    return model.eval()


def stage_inputs(channels: int, n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 14, 14, generator=g)  # non-negative, as after a ReLU


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_int8_stage_matches_the_float_stage(name):
    torch.manual_seed(0)
    layer4 = fold_batchnorm(with_statistics(create_model(name, width=0.125))).layer4
    x = stage_inputs(layer4[0].conv1.in_channels)
    stage = quantize_stage(layer4, lambda observed: observed(x[:8]))
    assert isinstance(stage, Int8Stage)
    assert sum(isinstance(m, QuantizedConv2d) for m in stage.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in layer4.modules()
    )
    with torch.inference_mode():
        expected, got = layer4(x[8:]), stage(x[8:])  # inputs the calibration did not see
    assert got.dtype == torch.float32 and got.shape == expected.shape
    similarity = F.cosine_similarity(got.flatten(1), expected.flatten(1))
    assert similarity.min() > 0.99
    # the original blocks are untouched (still float convolutions)
    assert all(type(m) is nn.Conv2d for m in layer4.modules() if isinstance(m, nn.Conv2d))


def test_unfolded_blocks_and_empty_calibration_are_clear_errors():
    layer4 = create_model("resnet18", width=0.125).eval().layer4
    with pytest.raises(ReslabError, match="fold its batch norms"):
        quantize_stage(layer4, lambda observed: None)
    folded = fold_batchnorm(create_model("resnet18", width=0.125)).layer4
    with pytest.raises(ReslabError, match="calibration ran no data"):
        quantize_stage(folded, lambda observed: None)


def test_zero_padding_shortcut_is_refused():
    model = fold_batchnorm(create_model("resnet20"))
    with pytest.raises(ReslabError, match="option B/C"):
        quantize_stage(model.layer2, lambda observed: None)


def test_squeeze_excite_blocks_are_refused_not_silently_dropped():
    model = fold_batchnorm(create_model("resnet18", width=0.125, se=4))
    with pytest.raises(ReslabError, match="squeeze-and-excitation"):
        quantize_stage(model.layer4, lambda observed: None)
