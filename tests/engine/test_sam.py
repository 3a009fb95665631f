"""Sharpness-aware minimisation: the gradient it takes, when it starts, what the budget plans."""

import copy
import json
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.engine import batches as batches_module
from reslab.engine import plan as plan_module
from reslab.engine import train as train_module
from reslab.engine.batches import Batch, sam_gradient, sam_steps
from reslab.engine.config import build_config
from reslab.engine.plan import planned_epochs
from reslab.engine.train import fit

from .test_train import StepClock, quiet, recording, tiny


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_sam_gradient_is_the_loss_gradient_at_the_ascended_weights():
    rho = 0.3
    model = small_net()
    config = build_config("default", sam=rho, precision="fp32", label_smoothing=0.0)
    state = types.SimpleNamespace(
        config=config, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)
    )
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    weights = copy.deepcopy(model.state_dict())
    F.cross_entropy(model(batch.x), batch.labels).backward()  # the step's first pass
    after_first = copy.deepcopy(model.state_dict())

    # by hand: w + rho * g / |g|, the loss's gradient there (batch statistics, as in training)
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum((grad**2).sum() for grad in grads))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, grad in zip(moved.parameters(), grads, strict=True):
            p.add_(grad * rho / norm)
    F.cross_entropy(moved(batch.x), batch.labels).backward()

    sam_gradient(state, model, batch)
    for p, q, grad in zip(model.parameters(), moved.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
        assert not torch.allclose(p.grad, grad)  # a different gradient from the first pass
    # the weights are back where they were; the second pass left the running statistics as
    # the first pass set them, and the batch norm's momentum as it was
    for name, value in model.state_dict().items():
        expected = weights[name] if "running" not in name else after_first[name]
        if "num_batches" not in name:
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
    assert not torch.equal(after_first["1.running_mean"], weights["1.running_mean"])
    assert model[1].momentum == 0.1


def test_sam_steps_count_the_last_share_of_the_run():
    config = build_config("default", epochs=4, sam=0.05, sam_start=0.75)
    assert batches_module.sam_begins(config, 10) == 30
    assert sam_steps(config, 10, 0, 40) == 10
    assert sam_steps(config, 10, 0, 30) == 0
    assert sam_steps(config, 10, 25, 35) == 5
    assert sam_steps(build_config("default", epochs=4), 10, 0, 40) == 0
    # after a re-plan anchored at step 10 with half the schedule done, the last quarter of the
    # schedule is the second half of the 30 steps left; a start already passed is the anchor's
    config.schedule_anchor = [10, 0.5]
    assert batches_module.sam_begins(config, 10) == 25
    assert batches_module.sam_begins(replace(config, sam_start=0.4), 10) == 10
    # with two frozen epochs first, the share is of the cycle after them
    assert batches_module.sam_begins(replace(config, schedule_anchor=[], freeze_epochs=2), 10) == 35


@pytest.mark.parametrize(
    ("sam", "done", "expected"),
    [
        (0.0, 0, 10),  # 10 epochs of 10 s in 100 s
        (0.05, 0, 6),  # SAM on the second half: 6 epochs and 3 epochs' second passes fit
        (0.05, 2, 8),  # 2 done: 6 more and 4 epochs' second passes (steps 40-79) fit
    ],
)
def test_planned_epochs_count_sams_second_passes(sam, done, expected):
    config = build_config("default", sam=sam, sam_start=0.5)
    assert planned_epochs(config, 10, 100.0, 10.0, done, 20) == expected


def test_sam_starts_after_its_share_of_the_steps(fake_fmnist, tmp_path, monkeypatch):
    # 5 steps an epoch; SAM from step 5 of 10: the second epoch alone takes it
    calls = []
    second_pass = batches_module.sam_gradient

    def spy(state, model, batch):
        calls.append(state.step)
        second_pass(state, model, batch)

    monkeypatch.setattr(train_module, "sam_gradient", spy)
    with_sam = fit(tiny(fake_fmnist, tmp_path / "sam", sam=0.05, sam_start=0.5), console=quiet())
    assert calls == [5, 6, 7, 8, 9]
    without = fit(tiny(fake_fmnist, tmp_path / "plain"), console=quiet())
    first, second = zip(with_sam.history, without.history, strict=True)
    assert first[0]["train_loss"] == first[1]["train_loss"]
    assert first[0]["test_loss"] == first[1]["test_loss"]
    assert second[0]["train_loss"] != second[1]["train_loss"]
    saved = json.loads((tmp_path / "sam" / "config.json").read_text())
    assert (saved["sam"], saved["sam_start"]) == (0.05, 0.5)


def test_max_minutes_plans_for_sams_second_passes(fake_fmnist, tmp_path, monkeypatch):
    # SAM on every step: the probe's 5 s epoch counts twice, so 2 of 5 epochs fit in 29.1 s.
    # Epoch 1 takes 6 s on the run's clock, with SAM in all of it: 3 s without, and 4 s the
    # median with the probe's 5 s, so 8 s for each epoch after; the 23.1 s left hold two more.
    # After epoch 2 (median 3 s, 6 s with SAM) the 17.1 s left hold two more again: 4.
    monkeypatch.setattr(plan_module, "seconds_per_epoch", lambda *a: 5.0)
    clock = StepClock(monkeypatch, 1.2)
    config = tiny(fake_fmnist, tmp_path / "run", epochs=5, max_minutes=0.5, sam=0.05, sam_start=0)
    console = recording()
    result = fit(config, console=console, hooks=clock)
    lines = [line for line in console.export_text().splitlines() if "time budget" in line]
    assert lines == [
        "time budget 0.5 min: one epoch takes about 5.0s here (measured), so 2 of 5 epochs, "
        "2.0 more for SAM's second passes",
        "time budget 0.5 min: epoch 1 took 6.0s (measured; median 4.0s with the probe's "
        "estimate), so 3 of 5 epochs instead of the 2 planned",
        "time budget 0.5 min: epoch 2 took 6.0s (measured; median 3.0s with the probe's "
        "estimate), so 4 of 5 epochs instead of the 3 planned",
    ]
    assert len(result.history) == 4
