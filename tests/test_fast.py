"""Folded batch norm and the bf16 path (reslab/fast.py)."""

import pytest
import torch
from torch import nn

from reslab import create_model, fast
from reslab.models import BLOCKS

# one tiny network per block type: the CIFAR layout for basic blocks, ResNet-50's for bottleneck
TINY = {
    "basic": ("resnet20", {"width": 0.5}),
    "plain_basic": ("plain_resnet20", {"width": 0.5}),
    "preact_basic": ("preact_resnet20", {"width": 0.5}),
    "bottleneck": ("resnet50", {"width": 0.125, "in_channels": 1, "stem": "small"}),
    "plain_bottleneck": ("plain_resnet50", {"width": 0.125, "in_channels": 1, "stem": "small"}),
    "preact_bottleneck": ("preact_resnet50", {"width": 0.125, "in_channels": 1, "stem": "small"}),
}


def randomized(name: str, **kwargs) -> nn.Module:
    """An eval-mode model whose batch norms are far from identity (fresh BN folds trivially)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


def test_every_block_type_is_covered():
    assert set(TINY) == set(BLOCKS)


@pytest.mark.parametrize("se", [0, 4], ids=["", "se"])
@pytest.mark.parametrize("kind", sorted(TINY))
def test_folded_model_matches(kind, se):
    name, kwargs = TINY[kind]
    model = randomized(name, **kwargs, se=se)
    folded = fast.fold_batchnorm(model)
    x = torch.randn(4, model.conv1.in_channels, 28, 28)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    norms = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    if kind.startswith("preact"):
        # only the BN-ReLU before each unit's first conv and the final BN-ReLU remain
        blocks = sum(len(stage) for stage in model.stages)
        assert len(norms) == blocks + 1
    else:
        assert norms == []
    # the original is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_projection_shortcut_is_folded():
    model = randomized("resnet20", width=0.5, shortcut="B")
    folded = fast.fold_batchnorm(model)
    downsample = folded.layer2[0].downsample
    assert isinstance(downsample[1], nn.Identity) and downsample[0].bias is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_bf16_inference_close_to_fp32():
    model = randomized("resnet20", width=0.5)
    x = torch.randn(8, 3, 32, 32)
    predictor = fast.prepare_for_inference(model, precision="bf16")
    with torch.no_grad():
        expected, got = model(x), predictor(x)
    assert got.dtype == torch.float32
    assert next(predictor.parameters()).dtype == torch.bfloat16
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


def test_fp32_inference_prepared_matches_and_is_channels_last():
    model = randomized("resnet18", width=0.125, in_channels=1, stem="small")
    predictor = fast.prepare_for_inference(model, precision="fp32")
    assert predictor.spec == model.spec
    assert predictor.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in predictor.parameters())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(predictor(x), model(x), rtol=1e-4, atol=1e-4)


def test_training_autocast_keeps_parameters_fp32():
    model = create_model("resnet20", width=0.5)
    model, precision = fast.prepare_for_training(model, precision="bf16")
    assert precision == "bf16"
    x = fast.to_input(torch.randn(4, 3, 32, 32))
    with fast.autocast(precision):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    nn.functional.cross_entropy(logits.float(), torch.arange(4)).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_compiled_inference_matches_and_compiles_per_batch_size():
    """The compiled, frozen fast path gives the eager model's outputs for two batch sizes (each
    batch size compiles its own static graph)."""
    model = randomized("resnet20", width=0.25)
    predictor = fast.prepare_for_inference(model, "fp32", compile=True)
    for batch in (3, 1):
        x = torch.randn(batch, 3, 16, 16)
        with torch.inference_mode():
            expected, got = model(x), predictor(x)
        assert got.shape == (batch, 10)
        assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
