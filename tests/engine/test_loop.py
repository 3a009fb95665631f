"""The training skeleton and its generic hooks."""

from __future__ import annotations

import math

import pytest
import torch

from reslab.engine import budget as budget_module
from reslab.engine.budget import Budget, StopAtDeadline
from reslab.engine.ema import UpdateEma, make_ema, restore_ema
from reslab.engine.loop import Every, Hook, Loop, NonFiniteLoss, StopOnNonFinite, run, skip
from reslab.engine.schedules import Schedule, lr_factor, paper_steps, warmup_cosine


class Quadratic:
    """Minimise (w - target)^2 for one weight; each batch is a target."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.optimizer = torch.optim.SGD([self.w], lr=0.1)

    def forward(self, target):
        return {"loss": (self.w - target) ** 2}

    def update(self, losses):
        self.optimizer.zero_grad()
        losses["loss"].backward()
        self.optimizer.step()


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def before_epoch(self, loop):
        self.events.append(("epoch", loop.epoch))

    def after_step(self, loop):
        self.events.append(("step", loop.step, loop.batch_in_epoch))

    def after_epoch(self, loop):
        self.events.append(("done", loop.epoch))


def test_run_counts_steps_and_epochs():
    recorder = Recorder()
    loop = run(Loop(epochs=2), lambda loop: [1.0, 2.0, 3.0], Quadratic(), [recorder])
    assert (loop.step, loop.epoch, loop.batch_in_epoch) == (6, 2, 0)
    assert recorder.events[:5] == [
        ("epoch", 0),
        ("step", 1, 1),
        ("step", 2, 2),
        ("step", 3, 3),
        ("done", 1),
    ]


class StopAt(Hook):
    def __init__(self, step):
        self.at = step

    def after_step(self, loop):
        loop.stop = loop.step == self.at


def test_a_stopped_epoch_is_not_counted_and_resumes_where_it_stopped():
    step = Quadratic()
    loop = run(
        Loop(epochs=2), lambda loop: skip([1.0, 2.0, 3.0], loop.batch_in_epoch), step, [StopAt(4)]
    )
    assert (loop.step, loop.epoch, loop.batch_in_epoch) == (4, 1, 1)
    stopped_w = step.w.item()
    loop.stop = False
    run(loop, lambda loop: skip([1.0, 2.0, 3.0], loop.batch_in_epoch), step)
    assert (loop.step, loop.epoch) == (6, 2)

    whole = Quadratic()
    run(Loop(epochs=2), lambda loop: [1.0, 2.0, 3.0], whole)
    assert step.w.item() == whole.w.item() != stopped_w


def test_non_finite_loss_stops_before_the_update():
    step = Quadratic()
    batches = [1.0, math.nan]
    with pytest.raises(NonFiniteLoss, match="loss at step 2"):
        run(
            Loop(epochs=1),
            lambda loop: batches,
            step,
            [StopOnNonFinite(lambda loop, bad: f"{', '.join(bad)} at step {loop.step + 1}")],
        )
    assert math.isfinite(step.w.item())  # the nan step never reached the weight


def test_schedule_sets_each_steps_rate_before_it():
    step = Quadratic()
    seen = []

    class Watch(Hook):
        def after_step(self, loop):
            seen.append(step.optimizer.param_groups[0]["lr"])

    total = 8
    schedule = Schedule(step.optimizer, lambda loop: lr_factor("onecycle", loop.step, total, 0.25))
    run(Loop(epochs=2), lambda loop: [1.0] * 4, step, [schedule, Watch()])
    assert seen == [0.1 * lr_factor("onecycle", s, total, 0.25) for s in range(total)]


def test_schedule_shapes():
    assert lr_factor("step", 4, 8, 0) == pytest.approx(0.1)
    assert lr_factor("step", 6, 8, 0) == pytest.approx(0.01)
    assert lr_factor("onecycle", 0, 100, 0.2) == pytest.approx(0.04)
    assert lr_factor("onecycle", 20, 100, 0.2) == pytest.approx(1.0)
    assert lr_factor("cosine", 100, 100, 0) == pytest.approx(0.0)
    assert warmup_cosine(0, 10, 0.0) == pytest.approx(0.001)
    assert warmup_cosine(10, 10, 0.5) == pytest.approx(0.5)
    assert paper_steps(49, 100) == 1.0 and paper_steps(50, 100) == pytest.approx(0.1)
    assert paper_steps(75, 100) == pytest.approx(0.01)


def test_every_acts_on_its_steps_and_epochs():
    calls = []
    run(
        Loop(epochs=2),
        lambda loop: [1.0] * 3,
        Quadratic(),
        [Every(lambda loop: calls.append(loop.step), 2, True)],
    )
    assert calls == [2, 3, 4, 6, 6]


def test_deadline_stops_before_a_step_once_the_budget_is_spent(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(budget_module, "now", lambda: clock[0])

    class Tick(Hook):
        def after_step(self, loop):
            clock[0] += 20.0

    budget = Budget(1.0)  # 60 s
    loop = run(
        Loop(epochs=None), lambda loop: [1.0] * 10, Quadratic(), [StopAtDeadline(budget), Tick()]
    )
    assert loop.step == 3 and loop.epoch == 0
    assert budget.used() == pytest.approx(1.0) and budget.spent()
    assert not Budget(0).spent() and Budget(0).used() == 0.0


def test_ema_hook_averages_the_weights_after_each_step():
    step = Quadratic()
    model = torch.nn.Module()
    model.w = step.w
    ema = make_ema(model, 0.5)
    run(Loop(epochs=1), lambda loop: [1.0, 1.0], step, [UpdateEma(ema, model)])
    w1 = 0.2  # w after one step of lr 0.1 from 0 towards 1
    w2 = w1 + 0.1 * 2 * (1 - w1)
    assert ema.module.w.item() == pytest.approx(0.5 * w1 + 0.5 * w2)
    restore_ema(ema, {"w": torch.tensor(3.0)}, 0)
    assert ema.module.w.item() == 3.0 and ema.n_averaged.item() == 1
    assert make_ema(model, 0.0) is None
