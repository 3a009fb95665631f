import pytest
import torch
from torch import nn

from reslab.analysis.degradation import DegradationConfig
from reslab.analysis.responses import reading, response_norms, response_stds, response_study
from reslab.models import create_model


def test_one_response_per_3x3_layer_after_its_norm_and_hooks_removed():
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1).eval()
    norms = response_norms(model)
    assert len(norms) == 19  # the stem and two per block: every 3x3 conv of ResNet-20
    x = torch.randn(4, 1, 28, 28)
    stds = response_stds(model, x)
    assert len(stds) == 19
    # the first block's bn2 output by hand: before the addition and the last ReLU
    block = model.layer1[0]
    with torch.no_grad():
        stem = model.forward_stem(x)
        hand = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(stem)))))
    assert stds[2] == pytest.approx(hand.std().item(), rel=1e-5)
    assert all(not norm._forward_hooks for norm in norms)


def test_hooks_are_removed_when_the_forward_fails():
    model = create_model("resnet20", in_channels=1)
    with pytest.raises(RuntimeError):
        response_stds(model, torch.randn(2, 3, 28, 28))  # wrong channel count
    assert all(not m._forward_hooks for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_tiny_study_shapes_and_reading(data):
    config = DegradationConfig(depths=(20, 32), epochs=1, train_size=16, test_size=8, batch_size=16)
    result = response_study(config, data(16, 0), data(8, 1))
    assert [n["name"] for n in result["networks"]] == [
        "plain_resnet20",
        "resnet20",
        "plain_resnet32",
        "resnet32",
    ]
    assert [len(n["layer_std"]) for n in result["networks"]] == [19, 19, 31, 31]
    for net in result["networks"]:
        assert net["sorted_std"] == sorted(net["layer_std"], reverse=True)
    assert [f["finding"] for f in result["reading"]] == [
        "ResNet-20 responses smaller than plain-20",
        "ResNet-32 responses smaller than plain-32",
        "ResNet-32 responses smaller than ResNet-20",
    ]


def test_reading_says_holds_and_does_not():
    nets = [
        {"residual": r, "depth": d, "mean_std": v}
        for r, d, v in ((False, 20, 1.0), (True, 20, 0.5), (False, 56, 1.2), (True, 56, 0.7))
    ]
    assert [f["holds"] for f in reading(nets)] == [True, True, False]
    nets[3]["mean_std"] = 0.4
    assert [f["holds"] for f in reading(nets)] == [True, True, True]
    assert reading(nets)[2]["deeper"] == 0.4
