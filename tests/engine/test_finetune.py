import pytest
import torch
from test_train import quiet, tiny

from reslab.cli import build_parser
from reslab.cli.train import config_from_args
from reslab.engine.config import build_config
from reslab.engine.schedules import lr_factor, phased, share_done, step_at
from reslab.engine.state import model_parts, part_rates
from reslab.engine.train import Hooks, fit
from reslab.errors import ReslabError
from reslab.models import create_model


class Snapshots(Hooks):
    """The weights and batch-norm statistics after every step, and each group's rate."""

    def __init__(self):
        self.states, self.rates = [], []

    def after_step(self, state, loss):
        self.states.append({k: v.clone() for k, v in state.model.state_dict().items()})
        self.rates.append([g["lr"] for g in state.optimizer.param_groups])


def body_keys(state: dict) -> list[str]:
    return [k for k in state if not k.startswith("fc.")]


def changed(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if not torch.equal(a[k], b[k])]


def run(fake_fmnist, tmp_path, name, **overrides):
    hooks = Snapshots()
    config = tiny(fake_fmnist, tmp_path / name, augment=False, **overrides)
    result = fit(config, console=quiet(), hooks=hooks)
    return result, hooks


def test_frozen_epochs_train_the_head_alone_then_everything(fake_fmnist, tmp_path):
    _, hooks = run(fake_fmnist, tmp_path, "ft", epochs=2, freeze_epochs=1, lr_spread=100.0)
    first, frozen_end, last = hooks.states[0], hooks.states[4], hooks.states[-1]  # 5 an epoch
    assert changed(first, frozen_end, body_keys(first)) == []  # weights and BN statistics
    assert changed(first, frozen_end, ["fc.weight", "fc.bias"]) == ["fc.weight", "fc.bias"]
    assert "layer1.0.conv1.weight" in changed(frozen_end, last, body_keys(first))
    assert "bn1.running_mean" in changed(frozen_end, last, body_keys(first))


def test_train_bn_keeps_the_norms_training_while_frozen(fake_fmnist, tmp_path):
    _, hooks = run(fake_fmnist, tmp_path, "bn", epochs=1, freeze_epochs=1, train_bn=True)
    moved = changed(hooks.states[0], hooks.states[-1], body_keys(hooks.states[0]))
    assert "bn1.running_mean" in moved and "bn1.weight" in moved
    assert not any(k.endswith("conv1.weight") for k in moved)


def test_without_freezing_the_body_trains_from_the_first_step(fake_fmnist, tmp_path):
    _, hooks = run(fake_fmnist, tmp_path, "plain", epochs=1)
    assert "layer1.0.conv1.weight" in changed(hooks.states[0], hooks.states[-1], hooks.states[0])


def test_cached_features_train_the_head_as_the_frozen_body_would(fake_fmnist, tmp_path):
    common = dict(epochs=2, freeze_epochs=2, label_smoothing=0.0)
    plain, plain_hooks = run(fake_fmnist, tmp_path, "plain", **common)
    cached, cached_hooks = run(fake_fmnist, tmp_path, "cached", cache_features=True, **common)
    for a, b in zip(plain_hooks.states, cached_hooks.states, strict=True):
        assert torch.allclose(a["fc.weight"], b["fc.weight"], atol=1e-5)
    assert plain_hooks.states[-1]["fc.weight"].ne(plain_hooks.states[0]["fc.weight"]).any()
    losses = [[r["train_loss"] for r in x.history] for x in (plain, cached)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_discriminative_rates_run_from_stem_to_head(fake_fmnist, tmp_path):
    _, hooks = run(
        fake_fmnist, tmp_path, "rates", epochs=2, freeze_epochs=1, lr_spread=100.0, freeze_lr=0.5
    )
    frozen, unfrozen = hooks.rates[0], hooks.rates[7]  # the frozen epoch's first step, then later
    assert len(set(frozen)) == 1 and frozen[0] == pytest.approx(
        0.5 * lr_factor("onecycle", 0, 5, 0.2)
    )
    assert max(unfrozen) / min(unfrozen) == pytest.approx(100.0)
    assert unfrozen[-1] == max(unfrozen)  # the head's groups come last


def test_parts_and_their_rates():
    model = create_model("resnet20", width=0.25, num_classes=3)
    parts = model_parts(model)
    assert list(parts) == ["stem", "layer1", "layer2", "layer3", "head"]
    assert [n for n, _ in parts["head"]] == ["fc.weight", "fc.bias"]
    config = build_config("default", lr=1.0, lr_spread=16.0)
    assert part_rates(config, 5) == pytest.approx([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1])


def test_phased_restarts_its_cycle_and_without_a_first_phase_is_lr_factor():
    for step in range(0, 100, 7):
        assert phased("onecycle", step, 0, 100, 0.2) == lr_factor("onecycle", step, 100, 0.2)
    assert phased("onecycle", 30, 30, 100, 0.2) == lr_factor("onecycle", 0, 70, 0.2)
    assert phased("onecycle", 29, 30, 100, 0.2) == lr_factor("onecycle", 29, 30, 0.2)


def test_an_anchor_spreads_the_rest_of_the_cycle_over_the_steps_left():
    # re-planned at step 40 of 100 to 160: the 60% left spread over 120 steps
    assert share_done(40, 160, (40, 0.4)) == pytest.approx(0.4)
    assert share_done(100, 160, (40, 0.4)) == pytest.approx(0.7)
    assert share_done(160, 160, (40, 0.4)) == 1.0 and share_done(40, 40, (40, 0.4)) == 1.0
    assert step_at(0.7, 160, (40, 0.4)) == 100 and step_at(0.3, 160, (40, 0.4)) == 40
    # the rate at the anchor is the old plan's, and the second cycle reads the anchor in its steps
    before = lr_factor("onecycle", 40, 100, 0.2)
    assert lr_factor("onecycle", 40, 160, 0.2, (40, 0.4)) == pytest.approx(before)
    assert phased("onecycle", 70, 30, 190, 0.2, (70, 0.4)) == pytest.approx(before)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (dict(cache_features=True), "add --freeze-epochs"),
        (dict(cache_features=True, freeze_epochs=1, train_bn=True), "drop --train-bn"),
        (dict(freeze_epochs=1, processes=2), "--processes 1"),
        (dict(lr_spread=0.5), "at least 1"),
        (dict(freeze_epochs=-1), "--freeze-epochs"),
    ],
)
def test_fine_tuning_values_that_cannot_work(values, needle):
    with pytest.raises(ReslabError, match=needle):
        build_config("default", **values)


def test_finetune_preset_and_its_flags():
    args = build_parser().parse_args(
        ["train", "--preset", "finetune", "--no-cache-features", "--lr-spread", "10"]
    )
    config, _, _ = config_from_args(args)
    assert (config.freeze_epochs, config.freeze_lr, config.lr_spread) == (1, 2e-3, 10.0)
    assert config.model_kwargs == {} and config.plan_data == []
