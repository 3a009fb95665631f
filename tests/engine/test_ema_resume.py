"""Weight averages checked by hand, and runs killed and resumed, for the classifier and the
detector; observed from outside the loops through torch's global hooks
(tests/engine/loop_traces.py)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import loop_traces as traces
import pytest
import torch

from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.detection import train_detector
from reslab.engine.train import fit, resume_config

Crash, HandEMA, StepRecorder = traces.Crash, traces.HandEMA, traces.StepRecorder
DECAY = 0.9


def assert_average(state: dict, average: dict) -> None:
    """The floating-point entries (weights and batch-norm statistics) of ``state`` are the hand
    average's; integer counters are not averaged meaningfully and are left out."""
    assert state.keys() == average.keys()
    floats = [name for name, value in average.items() if value.is_floating_point()]
    assert any("running_mean" in name for name in floats)  # the buffers are averaged too
    for name in floats:
        torch.testing.assert_close(state[name], average[name], rtol=1e-5, atol=1e-6, msg=name)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def raw_hashes(ema: HandEMA, into: list):
    """An after-step callback: the hash of the trained model's own weights after each step."""
    return lambda optimizer: into.append(traces.state_hash(ema.model.state_dict()))


def test_classifier_ema_is_the_average_of_the_raw_weights_and_buffers(fake_fmnist, tmp_path):
    ema, raw = HandEMA(DECAY), []
    with ema, StepRecorder(after_step=(ema.update, raw_hashes(ema, raw))) as steps:
        fit(
            traces.classifier_config(fake_fmnist, tmp_path / "run", ema=DECAY),
            console=traces.quiet(),
        )
    kept = load_checkpoint(tmp_path / "run" / "last.pt")
    assert steps.steps == 2 * traces.STEPS_PER_EPOCH
    # eval and predict load "state_dict": the average; resuming needs the raw weights
    assert_average(kept["state_dict"], ema.average)
    assert traces.state_hash(kept["train_state_dict"]) == raw[-1]
    moved = [
        name
        for name, value in kept["state_dict"].items()
        if value.is_floating_point() and not torch.allclose(value, kept["train_state_dict"][name])
    ]
    assert any("running_var" in name for name in moved) and any("conv" in name for name in moved)


def test_classifier_killed_mid_epoch_resumes_bit_for_bit_with_ema_and_sam(fake_fmnist, tmp_path):
    total = 2 * traces.STEPS_PER_EPOCH
    overrides = dict(ema=DECAY, sam=0.05, sam_start=0.5, save_every=1)
    with StepRecorder() as straight:
        fit(
            traces.classifier_config(fake_fmnist, tmp_path / "straight", **overrides),
            console=traces.quiet(),
        )

    # killed before step k: every step saved, so the checkpoint is step k - 1's, inside an
    # epoch and after SAM's second passes began (at half the steps)
    steps = [k for k in range(math.ceil(0.5 * total) + 2, total + 1) if (k - 1) % 5]
    kill_before = random.Random(20250611).choice(steps)
    run = tmp_path / "killed"
    ema = HandEMA(DECAY)
    with ema:
        recorder = StepRecorder(crash_before=kill_before, after_step=(ema.update,))
        with recorder as first, pytest.raises(Crash):
            fit(traces.classifier_config(fake_fmnist, run, **overrides), console=traces.quiet())
        saved = load_checkpoint(run / "last.pt")
        assert saved["step"] == kill_before - 1 == first.steps
        config, payload, run_dir = resume_config(str(run / "last.pt"))
        with StepRecorder(after_step=(ema.update,)) as second:
            fit(config, console=traces.quiet(), payload=payload, run_dir=run_dir)

    # the same steps at the same rates from the same gradients, to the same weights
    assert first.lr + second.lr == straight.lr
    assert first.grad_norm + second.grad_norm == straight.grad_norm
    whole, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(run)
    assert resumed["step"] == whole["step"] == total
    assert_same(resumed["train_state_dict"], whole["train_state_dict"])
    assert_same(resumed["state_dict"], whole["state_dict"])
    # and the average carried over the kill is still the average of every step's weights
    assert_average(resumed["state_dict"], ema.average)


def detector_data(write_bars, tmp_path: Path):
    folder = tmp_path / "bars"
    folder.mkdir()
    write_bars(folder, 8)  # 2 steps of 4 images an epoch
    return traces.detection_set(folder)


def test_detector_ema_is_the_average_of_the_raw_weights_and_buffers(write_bars, tmp_path):
    dataset = detector_data(write_bars, tmp_path)
    model = traces.tiny_detector()
    ema, raw = HandEMA(DECAY), []
    with ema, StepRecorder(after_step=(ema.update, raw_hashes(ema, raw))) as steps:
        train_detector(
            model,
            dataset,
            traces.detector_config(ema=DECAY),
            tmp_path / "run",
            console=traces.quiet(),
        )
    kept = load_checkpoint(tmp_path / "run" / "last.pt")
    assert steps.steps == 4
    assert_average(kept["state_dict"], ema.average)
    assert_average(model.state_dict(), ema.average)  # the model comes back averaged
    assert traces.state_hash(kept["train_state_dict"]) == raw[-1]


def test_detector_killed_resumes_from_the_uninterrupted_runs_state(write_bars, tmp_path):
    """Today the detector checkpoints at epoch ends only, and a resumed run's batches are not
    the uninterrupted run's (its loader is seeded anew for the epoch), so the final weights are
    not compared: the checkpoint it resumes from, the rates and the average are."""
    dataset = detector_data(write_bars, tmp_path)
    config = traces.detector_config(ema=DECAY)
    ema, raw, moments = HandEMA(DECAY), [], []

    def momentum(optimizer):
        moments.append([s["momentum_buffer"].clone() for s in optimizer.state.values()])

    with ema, StepRecorder(after_step=(ema.update, raw_hashes(ema, raw), momentum)) as straight:
        train_detector(
            traces.tiny_detector(), dataset, config, tmp_path / "straight", console=traces.quiet()
        )

    run, resumed_ema = tmp_path / "killed", HandEMA(DECAY)
    with resumed_ema:
        recorder = StepRecorder(crash_before=3, after_step=(resumed_ema.update,))
        with recorder as first, pytest.raises(Crash):
            train_detector(traces.tiny_detector(), dataset, config, run, console=traces.quiet())
        saved = load_checkpoint(run / "last.pt")
        assert (saved["epoch"], saved["step"]) == (1, 2) == (1, first.steps)
        # the checkpoint holds the uninterrupted run's weights and momentum after step 2
        assert traces.state_hash(saved["train_state_dict"]) == raw[1]
        saved_moments = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
        assert len(saved_moments) == len(moments[1])
        for got, want in zip(saved_moments, moments[1], strict=True):
            assert torch.equal(got.contiguous(), want.contiguous())
        with StepRecorder(after_step=(resumed_ema.update,)) as second:
            train_detector(
                traces.tiny_detector(), dataset, config, run, resume=True, console=traces.quiet()
            )
    assert first.lr + second.lr == straight.lr
    final = load_checkpoint(run / "last.pt")
    assert (final["epoch"], final["step"]) == (2, 4)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    assert_average(final["state_dict"], resumed_ema.average)
