"""Block wiring: what the shortcut takes, what plain blocks lack, and the shortcut options."""

import pytest
import torch
from torch import nn

from reslab.models import create_model
from reslab.models.blocks import (
    BasicBlock,
    Bottleneck,
    PadShortcut,
    PlainBasicBlock,
    PlainBottleneck,
    PreActBasicBlock,
    PreActBottleneck,
)

RESIDUAL = [BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck]
PLAIN = [PlainBasicBlock, PlainBottleneck]


def zero_convs(block):
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)


@pytest.mark.parametrize("block_class", PLAIN)
def test_plain_block_with_silent_branch_outputs_zero(block_class):
    # with every convolution zeroed the branch is zero; a plain block then has nothing left,
    # while a residual block would pass its input through
    block = block_class(16, 16 // block_class.expansion).eval()
    zero_convs(block)
    x = torch.rand(2, 16, 8, 8) + 0.1
    assert torch.count_nonzero(block(x)) == 0
    assert block.downsample is None


@pytest.mark.parametrize("block_class", [BasicBlock, Bottleneck])
def test_residual_block_with_silent_branch_is_the_identity(block_class):
    block = block_class(16, 16 // block_class.expansion).eval()
    zero_convs(block)
    x = torch.rand(2, 16, 8, 8)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("block_class", [BasicBlock, Bottleneck])
def test_projection_is_applied_to_the_block_input(block_class):
    block = block_class(8, 16, stride=2).eval()
    seen = {}
    block.downsample.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    x = torch.randn(2, 8, 8, 8)
    out = block(x)
    assert torch.equal(seen["x"], x)
    expected = torch.relu(block.branch(x) + block.downsample(x))
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("block_class", [PreActBasicBlock, PreActBottleneck])
def test_preact_block_adds_without_a_final_relu(block_class):
    block = block_class(8, 8 // block_class.expansion).eval()
    x = torch.randn(2, 8, 6, 6)
    out = block(x)
    assert (out < 0).any()
    activated = torch.relu(block.bn1(x))
    assert torch.allclose(out, block.branch(activated) + x)


def test_option_a_shortcut_has_no_parameters_and_pads_channels():
    block = BasicBlock(16, 32, stride=2, shortcut="A")
    assert isinstance(block.downsample, PadShortcut)
    assert sum(p.numel() for p in block.downsample.parameters()) == 0
    x = torch.randn(1, 16, 8, 8)
    y = block.downsample(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


def test_option_b_projects_only_where_the_shape_changes():
    model = create_model("resnet18", shortcut="B", width=0.25)
    with_projection = [b.downsample is not None for s in model.stages for b in s]
    assert with_projection == [False, False, True, False, True, False, True, False]


def test_option_c_projects_everywhere_and_costs_parameters():
    with torch.device("meta"):
        b = create_model("resnet34", shortcut="B")
        c = create_model("resnet34", shortcut="C")
    assert all(blk.downsample is not None for s in c.stages for blk in s)
    assert sum(p.numel() for p in c.parameters()) > sum(p.numel() for p in b.parameters())


@pytest.mark.parametrize("side", [8, 7])
def test_option_d_pools_before_the_projection_and_matches_the_branch(side):
    block = BasicBlock(8, 16, stride=2, shortcut="D").eval()
    pool, conv, norm = block.downsample
    assert conv.stride == (1, 1) and isinstance(norm, nn.BatchNorm2d)
    x = torch.randn(2, 8, side, side)
    # every input position counts: the mean of each 2x2 window (ragged at an odd edge)
    pooled = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
    assert torch.equal(pool(x), pooled)
    assert torch.allclose(block.downsample(x), norm(conv(pooled)))
    assert block(x).shape == block.branch(x).shape == (2, 16, (side + 1) // 2, (side + 1) // 2)


def test_option_d_is_option_b_where_the_map_keeps_its_size():
    d = create_model("resnet50", shortcut="D", width=0.25)
    b = create_model("resnet50", shortcut="B", width=0.25)
    # as many parameters (the pool has none), named one index later in each projection
    assert [n for n, _ in d.named_parameters()] != [n for n, _ in b.named_parameters()]
    assert sum(p.numel() for p in d.parameters()) == sum(p.numel() for p in b.parameters())
    assert isinstance(d.layer1[0].downsample[0], nn.Conv2d)  # stride 1, channels change
    assert all(isinstance(d.stages[i][0].downsample[0], nn.AvgPool2d) for i in (1, 2, 3))


def test_stride_placement_v1_and_v1_5():
    v15 = Bottleneck(64, 32, stride=2)
    v1 = Bottleneck(64, 32, stride=2, stride_in_1x1=True)
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))
    x = torch.randn(1, 64, 8, 8)
    assert v1(x).shape == v15(x).shape == (1, 128, 4, 4)


def test_plain_networks_have_no_shortcut_modules():
    model = create_model("plain_resnet50", width=0.25)
    assert not any("downsample" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("block_class", RESIDUAL + PLAIN)
def test_squeeze_excite_gates_the_branch_before_the_addition(block_class):
    block = block_class(16, 16 // block_class.expansion, se=4).eval()
    assert (block.se.fc1.out_channels, block.se.fc2.out_channels) == (4, 16)
    # a gate of zero everywhere silences the branch: what is left is the shortcut alone
    nn.init.zeros_(block.se.fc2.weight)
    nn.init.constant_(block.se.fc2.bias, -1e4)
    x = torch.rand(2, 16, 8, 8) + 0.1
    silent = block(x)
    assert torch.equal(silent, x if block.residual else torch.zeros_like(x))
    # a constant gate of one half halves it
    nn.init.zeros_(block.se.fc2.bias)
    preact = getattr(block, "preact", False)
    branch = block.branch(torch.relu(block.bn1(x)) if preact else x)
    expected = 0.5 * branch + (x if block.residual else 0)
    assert torch.allclose(block(x), expected if preact else torch.relu(expected), atol=1e-6)


def test_squeeze_excite_gate_follows_the_channel_means():
    block = BasicBlock(8, 8, se=2).eval()
    out = torch.randn(3, 8, 5, 5)
    gate = torch.sigmoid(block.se.fc2(torch.relu(block.se.fc1(out.mean((2, 3), keepdim=True)))))
    assert gate.shape == (3, 8, 1, 1) and gate.std() > 0  # differs by channel and image
    assert torch.allclose(block.se(out), out * gate)
    # the same means, moved around inside each map, give the same gates
    shuffled = out.flatten(2)[:, :, torch.randperm(25)].view_as(out)
    assert torch.allclose(block.se(shuffled) / shuffled, gate.expand_as(out), atol=1e-5)
