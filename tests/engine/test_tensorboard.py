"""Every run writes TensorBoard event files that hold what its metrics records hold."""

from __future__ import annotations

import json

import pytest
import torch
from loop_traces import classifier_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from reslab.engine.tensorboard import numbers, unnormalize, with_boxes
from reslab.engine.train import fit


def events(folder) -> EventAccumulator:
    board = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    return board


def test_a_classification_run_logs_steps_epochs_a_batch_and_the_confusion(fake_fmnist, tmp_path):
    config = classifier_config(fake_fmnist, tmp_path / "run", threads=1)
    result = fit(config)
    board = events(result.run_dir)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    steps = records[-1]["step"]  # 2 epochs of 5 steps
    losses = board.Scalars("step/loss")
    assert [e.step for e in losses] == list(range(1, steps + 1))
    rates = [e.value for e in board.Scalars("step/lr")]
    assert len(set(rates)) > 2  # the one-cycle schedule, step by step
    for name in ("test_acc", "train_loss", "lr"):
        logged = board.Scalars(f"epoch/{name}")
        assert [e.step for e in logged] == [r["epoch"] for r in records]
        assert [e.value for e in logged] == pytest.approx([r[name] for r in records])
    (batch,) = board.Images("train/batch")
    assert (batch.width, batch.height) == (16 * 8, 16)  # the 8 images of 16 px, in a row
    assert [e.step for e in board.Images("test/confusion")] == [1, 2]


def test_a_detector_batch_is_drawn_with_its_boxes():
    images = [torch.zeros(3, 20, 30), torch.zeros(3, 40, 10)]
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]])}, {"boxes": torch.zeros(0, 4)}]
    drawn = with_boxes(images, targets)
    assert drawn.shape == (2, 3, 40, 30)
    assert drawn[0, 0, 2, 2:13].min() == 1 and drawn[0, 1, 2, 5] == 0  # a red box edge
    assert drawn[1].max() == 0  # no boxes, a black image padded to the largest


def test_helpers():
    assert numbers({"epoch": 1, "step": 5, "acc": 0.5, "ok": True, "name": "x"}) == {"acc": 0.5}
    x = torch.tensor([[[[0.0]], [[1.0]]]])  # (1, 2, 1, 1)
    assert unnormalize(x, (0.5, 0.2), (0.1, 0.3)).flatten().tolist() == pytest.approx([0.5, 0.5])
