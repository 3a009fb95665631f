"""The zoo against the papers and torchvision: shapes, gradients, parameter counts, parity."""

import pytest
import torch
import torchvision

from reslab import ReslabError
from reslab.models import CIFAR_DEPTHS, IMAGENET_DEPTHS, create_model, list_models, model_defaults

# torchvision.models.resnetNN, 3 input channels, 1000 classes (also He et al. 2015, Table 1)
TORCHVISION_PARAMS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
}
# He et al. 2015, Table 6 (CIFAR-10, option A shortcuts), in millions
CIFAR_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_has_every_family_and_depth():
    names = set(list_models())
    for depth in [*IMAGENET_DEPTHS, *CIFAR_DEPTHS]:
        for prefix in ("", "preact_", "plain_"):
            assert f"{prefix}resnet{depth}" in names
    assert len(names) == 3 * (len(IMAGENET_DEPTHS) + len(CIFAR_DEPTHS))


@pytest.mark.parametrize("name", [n for n in list_models() if "1202" not in n])
def test_shapes_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    # a quarter of the width keeps every layer and connection at 1/16 of the cost
    model = create_model(name, in_channels=1, num_classes=7, width=0.25)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    features = model.forward_features(x)
    assert features.shape[:2] == (2, model.num_features)
    assert torch.equal(model.forward_head(features), out) or torch.allclose(
        model.forward_head(features), out, atol=1e-6
    )
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


def test_deepest_cifar_net_runs():
    model = create_model("resnet1202", width=0.25)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_parameter_count_equals_torchvision(depth):
    with torch.device("meta"):
        assert n_params(create_model(f"resnet{depth}")) == TORCHVISION_PARAMS[depth]


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS_M))
def test_cifar_parameter_count_matches_paper(depth):
    with torch.device("meta"):
        millions = n_params(create_model(f"resnet{depth}")) / 1e6
    assert round(millions, 2 if millions < 1 else 1) == CIFAR_PARAMS_M[depth]


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_torchvision_state_dict_loads_strictly_and_outputs_match(depth, tmp_path):
    torch.manual_seed(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    # give batch norm non-trivial statistics, so eval mode exercises them
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)
    model = create_model(f"resnet{depth}")
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model.eval()(x) - reference.eval()(x)).abs().max().item()
    assert diff <= 1e-5


def test_unknown_name_lists_close_matches():
    with pytest.raises(ReslabError, match="resnet50"):
        create_model("resnet5O")


def test_unknown_keyword_is_named():
    with pytest.raises(ReslabError, match="num_clases"):
        create_model("resnet18", num_clases=10)


def test_stems_set_stage_one_resolution():
    x = torch.zeros(1, 1, 28, 28)
    sizes = {
        stem: create_model("resnet18", in_channels=1, stem=stem).forward_stem(x).shape[-1]
        for stem in ("imagenet", "cifar", "small")
    }
    assert sizes == {"imagenet": 7, "cifar": 28, "small": 14}


def test_width_multiplier_scales_channels():
    with torch.device("meta"):
        model = create_model("resnet18", width=0.5)
    assert model.conv1.out_channels == 32
    assert model.num_features == 256


@pytest.mark.parametrize("width", [0.0, -1.0, float("nan"), float("inf")])
def test_width_multiplier_must_be_a_positive_number(width):
    with pytest.raises(
        ReslabError, match=f"width multiplier must be a positive number, got {width}"
    ):
        create_model("resnet18", width=width)


def test_zero_init_residual_zeroes_the_last_norm_of_each_branch():
    model = create_model("resnet50", zero_init_residual=True, width=0.25)
    for block in model.layer1:
        assert torch.count_nonzero(block.bn3.weight) == 0
    assert torch.count_nonzero(model.layer1[0].bn1.weight) > 0
    with pytest.raises(ReslabError, match="a plain network would start dead"):
        create_model("plain_resnet20", zero_init_residual=True)


def test_squeeze_excite_adds_a_gate_to_every_block_and_only_its_weights():
    plain = create_model("resnet18", width=0.25)
    gated = create_model("resnet18", width=0.25, se=4)
    blocks = [b for stage in gated.stages for b in stage]
    assert all(b.se is not None for b in blocks) and plain.layer1[0].se is None
    added = {k for k in gated.state_dict() if k not in plain.state_dict()}
    assert added and all(".se.fc" in k for k in added)
    # per block: C -> C/4 -> C, with biases
    expected = sum(2 * (c * (c // 4)) + c // 4 + c for c in (16, 16, 32, 32, 64, 64, 128, 128))
    assert sum(gated.state_dict()[k].numel() for k in added) == expected
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ReslabError, match="reduction ratio"):
            create_model("resnet18", se=bad)


def test_spec_rebuilds_the_model():
    model = create_model("plain_resnet20", in_channels=1, width=0.5)
    assert model.spec == {"name": "plain_resnet20", "kwargs": {"in_channels": 1, "width": 0.5}}
    again = create_model(model.spec["name"], **model.spec["kwargs"])
    again.load_state_dict(model.state_dict(), strict=True)


def test_defaults_follow_the_papers():
    assert model_defaults("resnet56")["shortcut"] == "A"
    assert model_defaults("resnet56")["widths"] == (16, 32, 64)
    assert model_defaults("resnet101")["layers"] == (3, 4, 23, 3)
    assert model_defaults("resnet152")["layers"] == (3, 8, 36, 3)
