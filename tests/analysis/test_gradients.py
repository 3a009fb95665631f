import math

import pytest
import torch

from reslab.analysis.degradation import normalize
from reslab.analysis.gradients import (
    GradientConfig,
    build,
    conv_gradient_norms,
    conv_layers,
    gradient_study,
    plot_gradients,
    summary_rows,
)
from reslab.errors import ReslabError


def batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, 10, (n,), generator=g)


def test_one_finite_norm_per_main_path_conv():
    images, labels = batch(8)
    torch.manual_seed(0)
    model = build("resnet18")  # option B: has 1x1 projection shortcuts
    projections = [
        n for n, m in model.named_modules() if "downsample" in n and hasattr(m, "weight")
    ]
    assert projections, "resnet18 should have projection shortcuts to leave out"
    loss, norms = conv_gradient_norms(model, normalize(images), labels)
    # conv1 + 8 basic blocks x 2 convs; the three projections are not on the main path
    assert len(norms) == len(conv_layers(model)) == 17
    assert all(math.isfinite(v) and v > 0 for v in norms)
    assert math.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind


def test_plain_twin_has_the_same_layer_indices():
    plain, residual = build("plain_resnet20"), build("resnet20")
    assert [n for n, _ in conv_layers(plain)] == [n for n, _ in conv_layers(residual)]
    assert len(conv_layers(residual)) == 19  # 6n+2 = 20 layers, less the classifier


def test_deep_plain_net_gradient_explodes_towards_the_input_at_init():
    # Measured first (seeds 0-3, 16 random images): plain-56's first conv gets 270-400x the
    # gradient norm of ResNet-56's, not less; batch norm makes plain nets' gradients explode
    # backwards (Yang et al. 2019) rather than vanish. The shortcuts keep first/last within ~25x.
    images, labels = batch(16)
    x = normalize(images)
    torch.manual_seed(0)
    _, plain = conv_gradient_norms(build("plain_resnet56"), x, labels)
    torch.manual_seed(0)
    _, residual = conv_gradient_norms(build("resnet56"), x, labels)
    assert plain[0] > 50 * residual[0]
    assert plain[0] / plain[-1] > 1000
    assert residual[0] / residual[-1] < 50


def test_study_measures_init_and_after_training(tmp_path):
    images, labels = batch(24)
    config = GradientConfig(names=("resnet20",), batch_size=8, steps=2)
    result = gradient_study(config, images, labels)
    assert [r["name"] for r in result["runs"]] == ["plain_resnet20", "resnet20"]
    for run in result["runs"]:
        assert len(run["init"]["norms"]) == len(run["trained"]["norms"]) == 19
        assert run["init"]["norms"] != run["trained"]["norms"]  # the training steps happened
    rows = summary_rows(result)
    assert len(rows) == 4 and all(r["finite"] for r in rows)
    assert rows[0]["ratio"] == pytest.approx(rows[0]["first"] / rows[0]["last"])
    png = plot_gradients(result, tmp_path / "gradients.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("names", [("plain_resnet20",), ("resnet9",), ("preact_resnet20",)])
def test_names_must_be_residual_registry_names(names):
    with pytest.raises(ReslabError, match="plain_ twins"):
        GradientConfig(names=names).check()


@pytest.mark.parametrize("lr, message", [(float("nan"), "finite number"), (-0.1, "> 0")])
def test_lr_must_be_a_positive_number(lr, message):
    with pytest.raises(ReslabError, match=f"--lr must be (a )?{message}"):
        GradientConfig(lr=lr).check()
