import pytest
import torch

from reslab.analysis.degradation import (
    DegradationConfig,
    degradation_study,
    final_rows,
    plot_degradation,
    random_subset,
    train_fixed_budget,
)
from reslab.engine.schedules import paper_steps
from reslab.errors import ReslabError
from reslab.models.resnet import create_model


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, 10, (n,), generator=g)


def test_lr_follows_the_papers_steps_scaled_to_the_budget():
    # He et al. 2015, section 4.2: 0.1, divided by 10 at 32k and 48k of 64k iterations
    assert [0.1 * paper_steps(s, 64) for s in (0, 31, 32, 47, 48, 63)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_tiny_study_writes_table_and_figure(tmp_path):
    config = DegradationConfig(
        depths=(20, 32), epochs=2, train_size=32, test_size=16, batch_size=16
    )
    seen = []
    result = degradation_study(
        config, data(40, 0), data(20, 1), lambda name, row: seen.append((name, row["epoch"]))
    )
    names = ["plain_resnet20", "resnet20", "plain_resnet32", "resnet32"]
    assert [r["name"] for r in result["runs"]] == names
    assert seen == [(n, e) for n in names for e in (1, 2)]
    assert (result["train_size"], result["test_size"]) == (32, 16)
    rows = final_rows(result)
    for row in rows:
        assert 0 <= row["train_error"] <= 1 and 0 <= row["test_error"] <= 1
        assert row["best_test_error"] <= row["test_error"]
    # plain and residual twins have the same parameters (option A shortcuts have none)
    assert rows[0]["params"] == rows[1]["params"] < rows[2]["params"] == rows[3]["params"]
    png = plot_degradation(result, tmp_path / "degradation.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_numbers():
    config = DegradationConfig(depths=(20, 32), epochs=1, train_size=16, test_size=8, batch_size=8)
    first = degradation_study(config, data(16, 0), data(8, 1))
    config.depths = (20, 44)
    second = degradation_study(config, data(16, 0), data(8, 1))
    assert first["runs"][0]["history"][0]["train_loss"] == pytest.approx(
        second["runs"][0]["history"][0]["train_loss"], rel=1e-5
    )


@pytest.mark.parametrize(
    "change",
    [{"depths": (20,)}, {"depths": (20, 21)}, {"epochs": 0}, {"lr": 0.0}, {"lr": float("nan")}],
)
def test_bad_configs_are_user_errors(change):
    with pytest.raises(ReslabError):
        DegradationConfig(**change).check()


def test_a_diverging_run_stops_with_a_one_line_error():
    config = DegradationConfig(epochs=2, batch_size=8, lr=1e30)
    g = torch.Generator().manual_seed(0)
    train, test = random_subset(*data(16, 0), 16, g), random_subset(*data(8, 1), 8, g)
    rows = []
    with pytest.raises(ReslabError, match=r"^the loss became nan in epoch 1; lower --lr$"):
        train_fixed_budget(
            create_model("resnet20", in_channels=1), train, test, config, rows.append
        )
    assert rows == []
