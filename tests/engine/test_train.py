import json
import math

import pytest
import torch

from reslab import precision as precision_module
from reslab.data.sources import fashion_mnist_source
from reslab.data.transforms import InputSpec, to_input
from reslab.engine import batches as batches_module
from reslab.engine import budget as budget_module
from reslab.engine import plan as plan_module
from reslab.engine import state as state_module
from reslab.engine.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.engine.config import build_config
from reslab.engine.train import Hooks, fit, lr_factor, resume_config
from reslab.errors import ReslabError


def tiny(data_dir, out, **overrides):
    """A resnet20 at a quarter width on 16x16 inputs: a few milliseconds a step."""
    values = dict(
        model="resnet20",
        model_kwargs={"width": 0.25},
        data_dir=str(data_dir),
        verify=False,
        image_size=16,
        epochs=2,
        max_minutes=0.0,  # exactly `epochs`, no timing probe before them
        precision="fp32",  # not the preset's auto: the same numerics on every CPU
        batch_size=8,
        lr=0.05,
        eval_batch_size=8,
        out=None if out is None else str(out),
    )
    values.update(overrides)
    return build_config("default", **values)


def quiet():
    from rich.console import Console

    return Console(file=open("/dev/null", "w"), force_terminal=False)


def test_loss_goes_down(fake_fmnist, tmp_path):
    config = tiny(fake_fmnist, tmp_path / "run", epochs=4, augment=False, label_smoothing=0.0)
    result = fit(config, console=quiet())
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert len(result.history) == 4 and result.history[-1]["step"] == 4 * (40 // 8)


def test_cutmix_run_learns(fake_fmnist, tmp_path):
    config = tiny(fake_fmnist, tmp_path / "run", epochs=4, cutmix=1.0, label_smoothing=0.0)
    result = fit(config, console=quiet())
    losses = [r["train_loss"] for r in result.history]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cutmix"] == 1.0


def test_training_crops_pad_with_black(fake_fmnist, tmp_path, monkeypatch):
    """Not with the normalised zero (the mean grey): black, what a 0 pixel becomes."""
    fills, augment = [], batches_module.augment

    def spy(x, padding, erasing, generator, fill=0.0):
        fills.append(torch.as_tensor(fill))
        return augment(x, padding, erasing, generator, fill)

    monkeypatch.setattr(batches_module, "augment", spy)
    fit(tiny(fake_fmnist, tmp_path / "run", epochs=1), console=quiet())
    spec = load_checkpoint(tmp_path / "run" / "last.pt")["input"]
    black = -torch.tensor(spec["mean"]) / torch.tensor(spec["std"])
    assert len(fills) == 40 // 8 and black.item() < -0.5
    assert all(torch.allclose(fill, black) for fill in fills)


def test_clean_epochs_train_the_last_epochs_on_flipped_whole_images(
    fake_fmnist, tmp_path, monkeypatch
):
    calls, augment, flip = [], batches_module.augment, batches_module.random_flip

    def spy_augment(x, *args, **kwargs):
        calls.append("augment")
        return augment(x, *args, **kwargs)

    def spy_flip(x, generator):
        out = flip(x, generator)
        # each image is itself or its mirror, never shifted
        pairs = zip(out, x, strict=True)
        assert all(torch.equal(o, i) or torch.equal(o, i.flip(2)) for o, i in pairs)
        calls.append("flip")
        return out

    monkeypatch.setattr(batches_module, "augment", spy_augment)
    monkeypatch.setattr(batches_module, "random_flip", spy_flip)
    config = tiny(fake_fmnist, tmp_path / "run", epochs=3, clean_epochs=1)
    fit(config, console=quiet())
    batches = 40 // 8
    assert calls == ["augment"] * (2 * batches) + ["flip"] * batches


def test_run_folder_contents(fake_fmnist, tmp_path):
    run = tmp_path / "run"
    result = fit(tiny(fake_fmnist, run, ema=0.9), console=quiet())
    assert result.run_dir == run
    names = {p.name for p in run.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "curves.png",
        "confusion.png",
    } <= names
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == "resnet20" and saved["ema"] == 0.9
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "elapsed_s"} <= set(
        records[0]
    )
    payload = load_checkpoint(run / "last.pt")
    assert payload["epoch"] == 2 and payload["step"] == 10
    assert payload["model"]["kwargs"] == {"width": 0.25, "in_channels": 1, "num_classes": 10}
    assert payload["input"]["size"] == 16 and payload["input"]["source_size"] == 28
    assert len(payload["classes"]) == 10 and "train_state_dict" in payload
    assert payload["test_accuracy"] == pytest.approx(result.test_accuracy)
    model_from_checkpoint(load_checkpoint(run / "best.pt"))  # rebuilds from the file alone


def test_default_run_folder_is_numbered_not_overwritten(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = state_module.new_run_dir(tiny(fake_fmnist, None))
    second = state_module.new_run_dir(tiny(fake_fmnist, None))
    assert second.name == first.name + "-2" and first.parent.name == "runs"
    (first / "last.pt").write_text("x")
    with pytest.raises(ReslabError, match="--force"):
        state_module.new_run_dir(tiny(fake_fmnist, first))
    assert state_module.new_run_dir(tiny(fake_fmnist, first, force=True)) == first


class StopAfterFirstEpoch(Hooks):
    def after_epoch(self, state, record):
        state.stop = True


def test_resume_continues_where_it_stopped(fake_fmnist, tmp_path):
    straight = fit(tiny(fake_fmnist, tmp_path / "a"), console=quiet())
    fit(tiny(fake_fmnist, tmp_path / "b"), console=quiet(), hooks=StopAfterFirstEpoch())
    assert load_checkpoint(tmp_path / "b")["epoch"] == 1

    config, payload, run_dir = resume_config(str(tmp_path / "b" / "last.pt"))
    assert run_dir == tmp_path / "b" and config.epochs == 2 and config.lr == 0.05
    resumed = fit(config, console=quiet(), payload=payload, run_dir=run_dir)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    a = load_checkpoint(tmp_path / "a")["state_dict"]
    b = load_checkpoint(tmp_path / "b")["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    assert resumed.test_accuracy == straight.test_accuracy

    with pytest.raises(ReslabError, match="already finished epoch 2"):
        resume_config(str(tmp_path / "b"))


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(fake_fmnist, tmp_path, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 9 else loss  # 5 train + 3 eval calls in epoch 1

    monkeypatch.setattr(batches_module.F, "cross_entropy", poisoned)
    config = tiny(fake_fmnist, tmp_path / "run", tta=False)
    with pytest.raises(ReslabError, match=r"loss became nan at step 6 \(epoch 2\).*last\.pt"):
        fit(config, console=quiet())
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "none"])
def test_schedules_start_and_end(schedule):
    factors = [lr_factor(schedule, s, 100, 0.2) for s in range(101)]
    assert max(factors) == pytest.approx(1.0)
    assert factors[-1] <= factors[0] or schedule == "onecycle"
    if schedule != "none":
        assert factors[-1] < 0.05


def test_epochs_within_counts_whole_epochs_up_to_the_cap():
    assert plan_module.epochs_within(100.0, 30.0, 10) == 3
    assert plan_module.epochs_within(100.0, 30.0, 2) == 2
    assert plan_module.epochs_within(20.0, 30.0, 5) == 0
    assert plan_module.epochs_within(-5.0, 30.0, 5) == 0


@pytest.mark.parametrize(("per_step", "taken"), [(0.1, 12), (3.0, 2), (1.0, 5)])
def test_the_probe_ends_early_once_its_steps_have_taken_a_few_seconds(monkeypatch, per_step, taken):
    # 12 steps of 0.1 s take 1.2 s; steps of 3 s stop at the least 2; steps of 1 s at 5 s
    clock = [0.0]
    monkeypatch.setattr(plan_module.time, "perf_counter", lambda: clock[0])

    def step():
        clock[0] += per_step

    assert plan_module.probe_steps(step, 12, plan_module.World()) == (
        taken,
        pytest.approx(taken * per_step),
    )


def test_epoch_estimate_is_positive_and_leaves_the_random_state(fake_fmnist, tmp_path):
    config = tiny(fake_fmnist, None, ema=0.9)
    source = state_module.open_source(config)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    seconds = plan_module.seconds_per_epoch(config, source, plan_module.World())
    assert math.isfinite(seconds) and seconds > 0
    assert torch.equal(torch.get_rng_state(), before)


class StepClock(Hooks):
    """The clock --max-minutes keeps time by, moved only by the run's steps: ``per_step[e]``
    seconds each in epoch e + 1, the last value for the epochs after (the probes, replaced by
    the tests, take none)."""

    def __init__(self, monkeypatch, *per_step: float):
        self.seconds, self.per_step = 0.0, per_step
        monkeypatch.setattr(budget_module, "now", lambda: self.seconds)

    def after_step(self, state, loss):
        self.seconds += self.per_step[min(state.epoch, len(self.per_step) - 1)]


def recording():
    from rich.console import Console

    return Console(record=True, file=open("/dev/null", "w"), force_terminal=False, width=200)


def test_tta_shift_scores_the_last_epoch_over_ten_views(fake_fmnist, tmp_path):
    run = tmp_path / "run"
    result = fit(tiny(fake_fmnist, run, tta_shift=1, image_size=28), console=quiet())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_views"] for r in records] == [2, 10]
    # by hand: the uint8 images moved one pixel with black (0) coming in, each and its mirror
    payload = load_checkpoint(run / "last.pt")
    model = model_from_checkpoint(payload).eval()
    source = fashion_mnist_source(str(fake_fmnist), verify=False)
    spec = InputSpec.from_dict(payload["input"])
    images = source.test_images
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    h, w = images.shape[-2:]
    moved = [images] + [
        padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        for dy, dx in ((0, -1), (0, 1), (-1, 0), (1, 0))
    ]
    with torch.no_grad():
        inputs = [to_input(m, spec) for m in moved]
        out = sum(model(x) + model(x.flip(3)) for x in inputs) / 10
    accuracy = (out.argmax(1) == source.test_labels).double().mean().item()
    assert result.test_accuracy == pytest.approx(accuracy)
    assert records[-1]["test_acc"] == pytest.approx(accuracy)
    loss = torch.nn.functional.cross_entropy(out, source.test_labels).item()
    assert records[-1]["test_loss"] == pytest.approx(loss, rel=1e-5)
    flip_only = (sum(model(x) + model(x.flip(3)) for x in inputs[:1]).argmax(1)).tolist()
    assert flip_only != out.argmax(1).tolist()  # the shifted views changed some answers


def test_max_minutes_sets_aside_the_last_evaluations_extra_views(
    fake_fmnist, tmp_path, monkeypatch
):
    # epochs of 10 s in a 60 s budget (58.2 s usable): 5 fit; the shift views' 20 s more for
    # the last evaluation leave room for 3
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *a: 10.0)
    monkeypatch.setattr(
        plan_module, "evaluation_seconds", lambda probe, source, shift=0: 25.0 if shift else 5.0
    )
    clock = StepClock(monkeypatch, 2.0)
    plain = fit(tiny(fake_fmnist, tmp_path / "plain", epochs=8, max_minutes=1.0), console=quiet(),
                hooks=clock)  # fmt: skip
    assert len(plain.history) == 5
    clock = StepClock(monkeypatch, 2.0)
    config = tiny(fake_fmnist, tmp_path / "shift", epochs=8, max_minutes=1.0, tta_shift=1)
    shift = fit(config, console=quiet(), hooks=clock)
    assert len(shift.history) == 3 and shift.history[-1]["test_views"] == 10


def test_max_minutes_plans_the_epochs_that_fit(fake_fmnist, tmp_path, monkeypatch):
    # one epoch "takes" 10 s (5 steps of 2 s) and the budget is 30 s: 97% of it holds 2 of
    # the 5 epochs asked, and the epochs' own times confirm the plan
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *a: 10.0)
    clock = StepClock(monkeypatch, 2.0)
    config = tiny(fake_fmnist, tmp_path / "run", epochs=5, max_minutes=0.5)
    console = recording()
    result = fit(config, console=console, hooks=clock)
    assert len(result.history) == 2 and result.history[-1]["lr"] == pytest.approx(0.0)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2
    assert "so 2 of 5 epochs" in console.export_text() and "took" not in console.export_text()
    # the same run with no budget trains all five
    full = fit(tiny(fake_fmnist, tmp_path / "full", epochs=5), console=quiet())
    assert full.history[-1]["epoch"] == 5


@pytest.mark.parametrize(
    ("estimate", "per_step", "planned", "after_first", "epochs"),
    [
        # the probe said 10 s, epoch 1 took 4 s: the median 7 s leaves room for 4 in 29.1 s,
        # and after epoch 2 (median 4 s) for all 5
        (10.0, 0.8, 2, 4, 5),
        # epoch 1 took 6 s: the median 8 s, 3 epochs; after epoch 2 (median 6 s) 4
        (10.0, 1.2, 2, 3, 4),
        # the probe said 5 s, epoch 1 took 12 s: the median 8.5 s, 3 epochs; after epoch 2
        # (median 12 s) the 5.1 s left hold no more
        (5.0, 2.4, 5, 3, 2),
    ],
)
def test_max_minutes_plans_again_from_the_first_epochs_time(
    fake_fmnist, tmp_path, monkeypatch, estimate, per_step, planned, after_first, epochs
):
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *a: estimate)
    clock = StepClock(monkeypatch, per_step)
    config = tiny(fake_fmnist, tmp_path / "run", epochs=5, max_minutes=0.5)
    console = recording()
    result = fit(config, console=console, hooks=clock)
    text = console.export_text()
    assert f"so {planned} of 5 epochs" in text
    median = (estimate + 5 * per_step) / 2
    assert (
        f"epoch 1 took {5 * per_step:.1f}s (measured; median {median:.1f}s with the probe's "
        f"estimate), so {after_first} of 5 epochs instead of the {planned} planned"
    ) in text
    assert [r["epoch"] for r in result.history] == list(range(1, epochs + 1))
    # the schedule follows the new plan: the one-cycle rate ends at zero on the last step
    assert result.history[-1]["lr"] == pytest.approx(0.0)
    assert result.history[0]["lr"] > 0
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["epochs"] == epochs
    assert load_checkpoint(run / "last.pt")["config"]["epochs"] == epochs


def test_max_minutes_plans_again_after_every_epoch_from_the_latest_three(
    fake_fmnist, tmp_path, monkeypatch
):
    # the probe says 4 s an epoch: 7 of 12 in 29.1 s. Epoch 1 takes 4.8 s (median 4.4 s with
    # the probe's, 24.3 s left): 6, a re-index, step 5 being within the rise of 30 steps.
    # Epochs 2-4 leave it at 6. Epoch 5 takes 2 s, the second such (median 2 s, 10.7 s left):
    # 10, anchored at step 25 where 25 of the 30 planned steps were done.
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *a: 4.0)
    assert plan_module.RECENT_EPOCHS == 3
    clock = StepClock(monkeypatch, 0.96, 0.96, 0.96, 0.4)
    config = tiny(fake_fmnist, tmp_path / "run", epochs=12, max_minutes=0.5)
    console = recording()
    result = fit(config, console=console, hooks=clock)
    lines = [line for line in console.export_text().splitlines() if "time budget" in line]
    assert lines == [
        "time budget 0.5 min: one epoch takes about 4.0s here (measured), so 7 of 12 epochs",
        "time budget 0.5 min: epoch 1 took 4.8s (measured; median 4.4s with the probe's "
        "estimate), so 6 of 12 epochs instead of the 7 planned",
        "time budget 0.5 min: epoch 5 took 2.0s (measured; median 2.0s of the latest 3 "
        "epochs), so 10 of 12 epochs instead of the 6 planned",
    ]
    assert len(result.history) == 10 and result.history[-1]["lr"] == pytest.approx(0.0)
    assert clock.seconds == pytest.approx(3 * 4.8 + 7 * 2)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["schedule_anchor"] == [25, pytest.approx(25 / 30)]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["schedule_anchor"][0] == 25


def fake_epochs(monkeypatch, fp32: float, bf16: float, native: bool = True) -> list[str]:
    """Epoch timings by precision instead of measured ones; returns the precisions timed."""
    timed = []

    def seconds(config, *args):
        timed.append(config.precision)
        return {"fp32": fp32, "bf16": bf16}[config.precision]

    monkeypatch.setattr(plan_module, "seconds_per_epoch", seconds)
    monkeypatch.setattr(precision_module, "bf16_supported", lambda: native)
    # no AMX: in the band between the thresholds AMX-BF16 takes bf16, and this CPU's own
    # flags must not decide the test
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    return timed


@pytest.mark.parametrize(
    ("fp32", "bf16", "chosen"), [(10.0, 5.0, "bf16"), (10.0, 9.0, "fp32"), (10.0, 20.0, "fp32")]
)
def test_auto_precision_keeps_bf16_only_when_timed_clearly_faster(
    fake_fmnist, monkeypatch, fp32, bf16, chosen
):
    timed = fake_epochs(monkeypatch, fp32, bf16)
    config = tiny(fake_fmnist, None, precision="auto")
    source = state_module.open_source(config)
    estimate = plan_module.choose_precision(config, source, plan_module.World(), quiet())
    assert config.precision == chosen and timed == ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]
    assert estimate == {"fp32": fp32, "bf16": bf16}[chosen]


def test_auto_precision_without_native_bf16_is_fp32_untimed(fake_fmnist, monkeypatch):
    timed = fake_epochs(monkeypatch, 10.0, 1.0, native=False)
    config = tiny(fake_fmnist, None, precision="auto")
    source = state_module.open_source(config)
    assert plan_module.choose_precision(config, source, plan_module.World(), quiet()) is None
    assert config.precision == "fp32" and timed == []


def test_auto_precision_is_resolved_before_the_run_and_its_timing_plans_the_budget(
    fake_fmnist, tmp_path, monkeypatch
):
    # bf16 "takes" 10 s an epoch, fp32 20 s, the budget 30 s: bf16, and 97% of 30 s holds 2 of
    # its epochs, planned from the choice's own timings (no seventh probe)
    timed = fake_epochs(monkeypatch, 20.0, 10.0)
    clock = StepClock(monkeypatch, 2.0)  # and the epochs take 10 s
    config = tiny(fake_fmnist, tmp_path / "run", epochs=5, max_minutes=0.5, precision="auto")
    result = fit(config, console=quiet(), hooks=clock)
    assert timed == ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16"] and len(result.history) == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["epochs"] == 2
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["precision"] == "bf16"


def test_max_minutes_too_short_for_one_epoch_is_an_error_before_the_run_folder(
    fake_fmnist, tmp_path, monkeypatch
):
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *a: 100.0)
    config = tiny(fake_fmnist, tmp_path / "run", max_minutes=1)
    with pytest.raises(ReslabError, match=r"--max-minutes 1: one epoch takes about 1m 40s"):
        fit(config, console=quiet())
    assert not (tmp_path / "run").exists()
