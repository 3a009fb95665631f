"""The time budget plans the epochs again after each of the first three epochs, and only then."""

from __future__ import annotations

import json

import loop_traces as traces

from reslab.engine import budget as budget_module
from reslab.engine import plan as plan_module
from reslab.engine.train import fit, lr_factor


def test_the_third_epochs_time_changes_the_plan_and_the_fourths_does_not(
    fake_fmnist, tmp_path, monkeypatch
):
    # The probe says 10 s an epoch: 2 of 8 fit in 97% of 30 s (29.1 s). The clock moves only
    # with the optimizer's steps (5 an epoch): epoch 1 takes 8 s (21.1 s left: 3 of 8),
    # epoch 2 4 s (17.1 s left: 6 of 8), epoch 3 2 s (15.1 s left: all 8). Epoch 4 takes 6 s,
    # which would cut the plan to 5 were it made again; planned after two epochs only, 6.
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *args: 10.0)
    seconds = [0.0]
    monkeypatch.setattr(budget_module, "now", lambda: seconds[0])
    per_step = (1.6, 0.8, 0.4, 1.2)  # epochs 1, 2, 3, then 4 and later

    def tick(optimizer):
        epoch = (recorder.steps - 1) // traces.STEPS_PER_EPOCH
        seconds[0] += per_step[min(epoch, len(per_step) - 1)]

    config = traces.classifier_config(fake_fmnist, tmp_path / "run", epochs=8, max_minutes=0.5)
    with traces.StepRecorder(after_step=(tick,)) as recorder:
        result = fit(config, console=traces.quiet())
    assert [r["epoch"] for r in result.history] == list(range(1, 9))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 8
    total = 8 * traces.STEPS_PER_EPOCH
    assert recorder.steps == total
    # the one-cycle schedule ends on the final plan's last step
    assert recorder.lr[-1][0] == config.lr * lr_factor("onecycle", total - 1, total, config.warmup)
