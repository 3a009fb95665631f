"""The time budget plans the epochs again after each epoch, from the median of the latest three
epoch times (the probe's estimate standing in at first), and the rate follows without a jump."""

from __future__ import annotations

import json

import loop_traces as traces
import pytest

from reslab.engine import budget as budget_module
from reslab.engine import plan as plan_module
from reslab.engine.train import fit, lr_factor


def train_with_epoch_times(fake_fmnist, tmp_path, monkeypatch, probe, per_step, epochs):
    """A budgeted run of ``epochs`` requested in 30 s (29.1 s to plan for) whose probe says
    ``probe`` seconds an epoch and whose clock moves only with the optimizer's steps, by
    ``per_step[e]`` seconds a step in epoch e + 1 (the last value for the later epochs)."""
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *args: probe)
    seconds = [0.0]
    monkeypatch.setattr(budget_module, "now", lambda: seconds[0])

    def tick(optimizer):
        epoch = (recorder.steps - 1) // traces.STEPS_PER_EPOCH
        seconds[0] += per_step[min(epoch, len(per_step) - 1)]

    config = traces.classifier_config(fake_fmnist, tmp_path / "run", epochs=epochs, max_minutes=0.5)
    with traces.StepRecorder(after_step=(tick,)) as recorder:
        result = fit(config, console=traces.quiet())
    return config, result, recorder


def test_one_slow_epoch_does_not_cut_the_plan(fake_fmnist, tmp_path, monkeypatch):
    # 2 s epochs, the third 6 s. Planned from that epoch alone, 19.1 s left would hold 3 more
    # (6 in all); the median of the probe and the three epochs is 2 s, so all 12 stay.
    config, result, recorder = train_with_epoch_times(
        fake_fmnist, tmp_path, monkeypatch, 2.0, (0.4, 0.4, 1.2, 0.4), epochs=12
    )
    assert [r["epoch"] for r in result.history] == list(range(1, 13))
    assert recorder.steps == 12 * traces.STEPS_PER_EPOCH


def test_a_lasting_slowdown_cuts_the_plan_and_a_lasting_speedup_grows_it_with_no_jump(
    fake_fmnist, tmp_path, monkeypatch
):
    # The probe says 2 s: all 12 fit. Epochs 1-3 take 5 s: after epoch 1 (median 3.5 s) 7,
    # re-indexed within the rise; after epoch 2 (median 5 s) 5, anchored. Epoch 4 takes 1 s:
    # (median 5 s) 6; after epoch 5 (median 1 s, 12.1 s left) all 12 again.
    config, result, recorder = train_with_epoch_times(
        fake_fmnist, tmp_path, monkeypatch, 2.0, (1.0, 1.0, 1.0, 0.2), epochs=12
    )
    assert [r["epoch"] for r in result.history] == list(range(1, 13))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["epochs"] == 12 and saved["schedule_anchor"][0] == 5 * traces.STEPS_PER_EPOCH
    total = 12 * traces.STEPS_PER_EPOCH
    assert recorder.steps == total
    # the rate rises to its peak and from there never rises again, though the plan grew twice
    # in the decay, and ends on the final plan's last step
    rates = [lr[0] for lr in recorder.lr]
    peak = rates.index(max(rates))
    falls = zip(rates[peak:-1], rates[peak + 1 :], strict=True)
    assert all(later <= earlier + 1e-12 for earlier, later in falls)
    last = lr_factor("onecycle", total - 1, total, config.warmup, saved["schedule_anchor"])
    assert rates[-1] == pytest.approx(config.lr * last) and rates[-1] < 0.01 * config.lr
