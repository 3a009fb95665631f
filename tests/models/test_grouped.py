"""Grouped copies (reslab/models/grouped.py): N models in one network, each as if alone."""

import pytest
import torch
import torch.nn.functional as F

from reslab.engine.config import build_config
from reslab.engine.state import make_optimizer
from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.models.grouped import pack, unpack

SMALL = {"in_channels": 1, "num_classes": 10, "stem": "cifar", "width": 0.25}
CASES = [
    ("resnet18", {}),
    ("preact_resnet18", {}),
    ("resnet18", {"shortcut": "D", "se": 4, "widths": [64, 192, 384, 768]}),
    ("resnet50", {"width": 1 / 16}),
    ("resnet20", {"shortcut": "B", "width": 1.0}),
]


def copies(name: str, kwargs: dict, n: int = 3) -> list:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(create_model(name, **{**SMALL, **kwargs}))
    with torch.no_grad():  # distinct batch-norm values, so that a mix-up of copies would show
        for model in models:
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return models


def inputs(n: int, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, n, 28, 28, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(("name", "kwargs"), CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_each_copy_computes_what_its_model_computes(name, kwargs, mode):
    models = copies(name, kwargs)
    grouped = pack(models)
    x = inputs(len(models))
    grouped.train(mode == "train")
    for m in models:
        m.train(mode == "train")
    out = grouped(x)  # (B, copies, classes)
    expected = torch.stack([m(x[:, i : i + 1]) for i, m in enumerate(models)], 1)
    assert out.shape == expected.shape == (4, 3, 10)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    # train mode updated each copy's running statistics from its own batch only
    for again, model in zip(unpack(grouped), models, strict=True):
        torch.testing.assert_close(again.state_dict(), model.state_dict())


def test_two_steps_on_the_summed_loss_are_each_copys_own_steps():
    # in float64: at lr 0.2 on 8 images float32's rounding alone grows to 1% in two steps
    models = [m.double() for m in copies("resnet18", {"widths": [64, 192, 384, 768]})]
    config = build_config("best")  # SGD, Nesterov, weight decay off batch norms and biases
    grouped = pack(models)
    before = grouped.network.fc.weight.detach().clone()
    x = inputs(3, 8).double()
    y = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(config, grouped)
    for _ in range(2):  # the second step uses the momentum of the first
        loss = F.cross_entropy(grouped(x).reshape(-1, 10), y.reshape(-1), label_smoothing=0.1)
        optimizer.zero_grad()
        (loss * 3).backward()  # the sum of the copies' mean losses
        optimizer.step()
    for i, model in enumerate(models):
        own = make_optimizer(config, model)
        for _ in range(2):
            own.zero_grad()
            F.cross_entropy(model(x[:, i : i + 1]), y[:, i], label_smoothing=0.1).backward()
            own.step()
    assert not torch.equal(grouped.network.fc.weight, before)  # the steps did move the weights
    for again, model in zip(unpack(grouped), models, strict=True):
        torch.testing.assert_close(again.state_dict(), model.state_dict())


def test_pack_keeps_parameter_count_and_unpack_inverts_it():
    models = copies("resnet18", {})
    grouped = pack(models)
    count = sum(p.numel() for p in models[0].parameters())
    assert sum(p.numel() for p in grouped.parameters()) == 3 * count
    for again, model in zip(unpack(grouped), models, strict=True):
        assert again.spec == model.spec
        torch.testing.assert_close(again.state_dict(), model.state_dict(), atol=0, rtol=0)


def test_what_cannot_be_packed_is_refused():
    with pytest.raises(ReslabError, match="option A"):
        pack(copies("resnet20", {"width": 1.0}))  # the CIFAR ResNets' zero-padding shortcut
    mixed = [create_model("resnet18", **SMALL), create_model("resnet34", **SMALL)]
    with pytest.raises(ReslabError, match="copies of one model"):
        pack(mixed)
    with pytest.raises(ReslabError, match="at least one"):
        pack([])
