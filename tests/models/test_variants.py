"""He et al. 2016's shortcut variants (merges) and activation orderings: each differs from the
original block only where the paper's figure says it does."""

import pytest
import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.models.blocks import MERGES, ORDERINGS, BasicBlock


def twin(merge: str, **kwargs) -> tuple[BasicBlock, BasicBlock]:
    """A block with ``merge`` and an original block holding the same weights."""
    torch.manual_seed(0)
    block = BasicBlock(8, 8, merge=merge, **kwargs)
    original = BasicBlock(8, 8, **kwargs)
    original.load_state_dict(block.state_dict(), strict=False)
    return block.eval(), original.eval()


def test_constant_scaling_at_one_is_the_identity_shortcut_and_at_half_halves_the_sum():
    block, original = twin("scale")
    x = torch.randn(2, 8, 6, 6)
    block.merge.scale = 1.0
    assert torch.equal(block(x), original(x))
    block.merge.scale = 0.5
    sum_ = original.branch(x) + x
    assert torch.allclose(block(x), torch.relu(0.5 * sum_), atol=1e-6)


def shut(gate: nn.Conv2d, bias: float) -> None:
    nn.init.zeros_(gate.weight)
    nn.init.constant_(gate.bias, bias)


def test_shortcut_gate_at_zero_is_the_identity_shortcut():
    block, original = twin("shortcut_gate")
    x = torch.randn(2, 8, 6, 6)
    shut(block.merge.gate, -1e4)  # g = 0: (1 - g) x + F(x) = x + F(x)
    assert torch.equal(block(x), original(x))
    shut(block.merge.gate, 1e4)  # g = 1: the shortcut is gone, a plain block is left
    assert torch.allclose(block(x), torch.relu(original.branch(x)))


def test_exclusive_gate_passes_the_shortcut_at_zero_and_the_branch_at_one():
    block, original = twin("exclusive_gate")
    x = torch.randn(2, 8, 6, 6)
    shut(block.merge.gate, -1e4)
    assert torch.equal(block(x), torch.relu(x))
    shut(block.merge.gate, 1e4)
    assert torch.allclose(block(x), torch.relu(original.branch(x)))
    shut(block.merge.gate, 0.0)  # g = 1/2 everywhere
    assert torch.allclose(block(x), torch.relu(0.5 * x + 0.5 * original.branch(x)), atol=1e-6)


def test_gate_starts_at_the_papers_bias_and_reads_the_block_input():
    block = BasicBlock(8, 16, stride=2, shortcut="A", merge="exclusive_gate")
    assert torch.all(block.merge.gate.bias == -6.0)
    assert block.merge.gate.stride == (2, 2) and block.merge.gate.out_channels == 16


def test_dropout_shortcut_drops_in_training_only():
    block, original = twin("dropout")
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(block(x), original(x))  # evaluation: the plain sum
    block.train()
    torch.manual_seed(1)
    branch = block.branch(x)
    torch.manual_seed(1)
    out = block(x)
    kept = (out != torch.relu(branch)).float().mean()
    assert 0.2 < kept < 0.8  # about half the shortcut survives


def test_conv_shortcut_is_option_c():
    model = create_model("resnet20", shortcut="C", in_channels=1)
    assert all(b.downsample is not None for stage in model.stages for b in stage)


def blocks_of(ordering: str) -> BasicBlock:
    torch.manual_seed(0)
    model = create_model("resnet20", ordering=ordering, in_channels=1)
    return model.layer1[1].eval(), model


def test_each_ordering_forward_matches_a_hand_computation():
    x = torch.randn(2, 16, 6, 6)
    relu = torch.relu
    block, _ = blocks_of("bn_after_add")
    hand = relu(block.bn_out(block.conv2(relu(block.bn1(block.conv1(x)))) + x))
    assert torch.allclose(block(x), hand, atol=1e-6)
    block, _ = blocks_of("relu_before_add")
    hand = relu(block.bn2(block.conv2(relu(block.bn1(block.conv1(x)))))) + x
    assert torch.allclose(block(x), hand, atol=1e-6)
    block, _ = blocks_of("relu_preact")
    hand = block.bn2(block.conv2(relu(block.bn1(block.conv1(relu(x)))))) + x
    assert torch.allclose(block(x), hand, atol=1e-6)
    block, _ = blocks_of("full_preact")
    hand = block.conv2(relu(block.bn2(block.conv1(relu(block.bn1(x)))))) + x
    assert torch.allclose(block(x), hand, atol=1e-6)


@pytest.mark.parametrize("ordering", list(ORDERINGS))
def test_orderings_build_trainable_networks_of_one_size(ordering):
    _, model = blocks_of(ordering)
    out = model(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None for p in model.parameters())
    ends_with_sum = ordering in ("relu_preact", "full_preact")
    assert isinstance(model.final_norm, nn.Sequential) == ends_with_sum


@pytest.mark.parametrize("merge", list(MERGES))
def test_merges_build_through_the_registry(merge):
    model = create_model("resnet20", merge=merge, in_channels=1)
    assert model.spec["kwargs"]["merge"] == merge
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"merge": "gate"},
        {"ordering": "sideways"},
        {"merge": "scale", "ordering": "full_preact"},
    ],
)
def test_unknown_variants_are_user_errors(kwargs):
    with pytest.raises(ReslabError):
        create_model("resnet20", **kwargs)


def test_ordering_needs_a_residual_basic_network():
    with pytest.raises(ReslabError, match="plain_resnet20"):
        create_model("plain_resnet20", ordering="relu_preact")
