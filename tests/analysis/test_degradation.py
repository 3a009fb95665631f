from dataclasses import replace

import pytest
import torch

from reslab.analysis.degradation import (
    PLAN_MARGIN,
    DegradationConfig,
    budget_config,
    check_claims,
    claims_title,
    degradation_study,
    figure_title,
    final_rows,
    network_rows,
    plan_epochs,
    plot_degradation,
    random_subset,
    seconds_per_epoch,
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


def made_up(errors: dict[tuple[bool, int], list[tuple[float, float]]]) -> dict:
    """A study result with one run per (residual, depth) and seed, each ending at the given
    (training error, test error)."""
    runs = [
        {
            "name": f"{'' if residual else 'plain_'}resnet{depth}",
            "seed": seed,
            "depth": depth,
            "residual": residual,
            "params": 1,
            "history": [
                {"epoch": 1, "train_error": 0.9, "test_error": 0.9, "seconds": 1.0},
                {"epoch": 2, "train_error": train, "test_error": test, "seconds": 1.0},
            ],
        }
        for (residual, depth), ends in errors.items()
        for seed, (train, test) in enumerate(ends)
    ]
    config = {**DegradationConfig(seeds=2).__dict__, "depths": [20, 56]}
    return {"config": config, "train_size": 10, "test_size": 10, "runs": runs}


PAPER = {  # each claim holds, over the mean of two seeds
    (False, 20): [(0.10, 0.12), (0.12, 0.14)],
    (False, 56): [(0.20, 0.22), (0.16, 0.18)],
    (True, 20): [(0.08, 0.11), (0.10, 0.13)],
    (True, 56): [(0.05, 0.09), (0.07, 0.10)],
}


def test_claims_all_hold_on_the_papers_picture():
    claims = check_claims(made_up(PAPER))
    assert [c["held"] for c in claims] == [True, True, True]
    assert claims[0]["deep"] == pytest.approx(0.18) and claims[0]["shallow"] == pytest.approx(0.11)
    assert claims[2]["text"] == "ResNet-56 ends with a lower test error than ResNet-20"
    assert claims_title(claims) == "both halves of the paper's Figure 6 hold here"


@pytest.mark.parametrize(
    ("key", "change", "index"),
    [
        ((False, 56), [(0.05, 0.22), (0.06, 0.18)], 0),  # deep plain fits better
        ((True, 56), [(0.12, 0.09), (0.14, 0.10)], 1),  # deep ResNet fits worse
        ((True, 56), [(0.05, 0.20), (0.07, 0.10)], 2),  # deep ResNet tests worse, on the mean
    ],
)
def test_each_claim_fails_alone_and_the_title_says_so(key, change, index, tmp_path):
    result = made_up({**PAPER, key: change})
    claims = check_claims(result)
    assert [c["held"] for c in claims] == [i != index for i in range(3)]
    title = claims_title(claims)
    assert title.startswith("NOT shown at this budget: ") and claims[index]["text"] in title
    result["claims"] = claims
    rows = {r["name"]: r for r in network_rows(result)}
    assert rows["resnet56"]["seeds"] == 2
    assert rows["plain_resnet20"]["test_range"] == [0.12, 0.14]
    plot_degradation(result, tmp_path / "f.png")  # the title is drawn from the claims
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_the_figure_title_holds_every_failed_claim_in_lines_that_fit():
    result = made_up({**PAPER, (True, 56): [(0.12, 0.20), (0.14, 0.20)]})  # both ResNet claims
    lines = figure_title(result).splitlines()
    assert len(lines) >= 3 and max(map(len, lines)) <= 100
    assert " ".join(lines[1:]) == claims_title(check_claims(result))


def test_budgets_are_configs_and_flags_override_them():
    default = budget_config("default")
    assert (default.train_size, default.test_size, default.seeds, default.pad) == (
        60_000,
        10_000,
        2,
        2,
    )
    paper = budget_config("paper")
    steps = paper.epochs * -(-paper.train_size // paper.batch_size)
    assert 64_000 <= steps < 64_000 + 469  # the paper's 64k iterations of 128 images
    assert budget_config("default", epochs=9, pad=None).epochs == 9
    with pytest.raises(ReslabError, match="--budget"):
        budget_config("huge")


def test_a_time_budget_plans_the_epochs_from_timed_steps():
    assert budget_config("default").minutes == 0  # the default trains its 3 epochs
    default = budget_config("default", minutes=55)
    step = {"plain_resnet20": 0.04, "resnet20": 0.04, "plain_resnet56": 0.1, "resnet56": 0.1}
    epoch = seconds_per_epoch(default, step.__getitem__)
    # 469 training steps and 79 test batches at a third of a step, of each network, 2 seeds
    assert epoch == pytest.approx(PLAN_MARGIN * 2 * (469 + 79 / 3) * 0.28)
    assert plan_epochs(default, epoch) == 9  # 3,300 s / 360.6 s
    assert plan_epochs(default, 1e6) == 1 and plan_epochs(default, 1e-3) == 137
    with pytest.raises(ReslabError, match="--epochs and --minutes"):
        budget_config("default", epochs=4, minutes=10.0)


def test_augmentation_and_warmup_change_the_run_only_when_asked(monkeypatch):
    config = DegradationConfig(epochs=1, batch_size=8, seed=3)
    g = torch.Generator().manual_seed(0)
    train, test = random_subset(*data(16, 0), 16, g), random_subset(*data(8, 1), 8, g)
    rates = []
    sgd_step = torch.optim.SGD.step

    def spy(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return sgd_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)

    def run(**change):
        torch.manual_seed(0)
        model = create_model("resnet20", in_channels=1)
        history = train_fixed_budget(model, train, test, replace(config, **change))
        return history[0]["train_loss"]

    plain = run()
    assert run() == plain
    assert run(pad=2) != plain
    rates.clear()
    run(epochs=2, warmup=0.25)  # 4 steps, the first at lr / 10, then the paper's steps
    assert rates == pytest.approx([0.01, 0.1, 0.01, 0.001])
