"""The pre-activation block's shortcut, where it changes shape, takes the block's input after
its batch norm and ReLU (He et al. 2016, "Identity Mappings in Deep Residual Networks": the
authors' code projects the pre-activated input), not the raw input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.models import create_model
from reslab.models.blocks import PreActBasicBlock, PreActBottleneck


def skewed(block: nn.Module) -> nn.Module:
    """Batch-norm statistics and scales far from identity, so that BN + ReLU moves the input."""
    g = torch.Generator().manual_seed(0)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return block.eval()


@pytest.mark.parametrize("block_class", [PreActBasicBlock, PreActBottleneck])
@pytest.mark.parametrize("shortcut", ["A", "B", "C", "D"])
def test_preact_projection_takes_the_preactivated_input(block_class, shortcut):
    block = skewed(block_class(8, 16, stride=2, shortcut=shortcut))
    seen = {}
    block.downsample.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        out = block(x)
        bn = block.bn1
        activated = F.relu(
            F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        )
        assert not torch.allclose(activated, x)
        torch.testing.assert_close(seen["x"], activated)
        expected = block.branch(activated) + block.downsample(activated)
    torch.testing.assert_close(out, expected)


def test_preact_basic_projection_by_hand():
    block = skewed(PreActBasicBlock(4, 8, stride=2))
    x = torch.randn(3, 4, 6, 6)
    bn, conv = block.bn1, block.downsample[0]
    with torch.no_grad():
        activated = F.relu(
            (x - bn.running_mean[:, None, None])
            / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
            * bn.weight[:, None, None]
            + bn.bias[:, None, None]
        )
        shortcut = F.conv2d(activated, conv.weight, stride=2)  # 1x1, stride 2, no norm after
        raw = F.conv2d(x, conv.weight, stride=2)
        branch = block.conv2(F.relu(block.bn2(block.conv1(activated))))
        out = block(x)
    torch.testing.assert_close(out, branch + shortcut)
    assert not torch.allclose(out, branch + raw, atol=1e-3)


def test_every_preact_network_block_projects_its_preactivated_input():
    model = create_model("preact_resnet18", width=0.25).eval()
    blocks = [m for m in model.modules() if isinstance(m, PreActBasicBlock)]
    projected = [b for b in blocks if b.downsample is not None]
    assert len(projected) == 3  # where stages 2-4 halve the map
    inputs, shortcut_inputs = {}, {}
    for b in projected:
        b.register_forward_pre_hook(lambda m, args: inputs.update({m: args[0]}))
        b.downsample.register_forward_pre_hook(
            lambda m, args, b=b: shortcut_inputs.update({b: args[0]})
        )
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        for b in projected:
            torch.testing.assert_close(shortcut_inputs[b], F.relu(b.bn1(inputs[b])))
            assert not torch.allclose(shortcut_inputs[b], inputs[b])
