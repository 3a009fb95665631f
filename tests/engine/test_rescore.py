"""The rescoring classifier: windows around boxes, its training, and the scores it gives."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from reslab.engine import budget as budget_module
from reslab.engine.rescore import (
    SIDE,
    Rescorer,
    rescorer_accuracy,
    rescorer_from_checkpoint,
    squares,
    train_rescorer,
    windows,
)
from reslab.engine.schedules import warmup_cosine
from reslab.errors import ReslabError


def test_squares_keep_the_centre_and_take_the_longer_side():
    boxes = torch.tensor([[10.0, 20.0, 34.0, 28.0], [0.0, 0.0, 6.0, 12.0]])
    expected = torch.tensor([[10.0, 12.0, 34.0, 36.0], [-3.0, 0.0, 9.0, 12.0]])
    torch.testing.assert_close(squares(boxes), expected)


def test_windows_show_each_box_across_the_classifiers_input():
    image = torch.zeros(1, 64, 64)  # grey, as a one-channel image comes
    image[:, 30:38, 20:44] = 1.0  # a 24x8 bar
    x = windows([image], [torch.tensor([[20.0, 30.0, 44.0, 38.0]])])
    assert x.shape == (1, 3, SIDE, SIDE)
    # the bar's 24 pixels span the window; its 8 rows are the middle third, black around
    assert x[0, :, SIDE // 2, 1:-1].min() > 0.9
    third = SIDE / 3
    assert x[0, :, : math.floor(third) - 1].max() < 0.1
    assert x[0, :, math.ceil(2 * third) + 1 :].max() < 0.1


class FixedLogits(nn.Module):
    """A stand-in classifier whose probabilities are ``probs`` for any window."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.tensor(probs).log()
        self.fc = nn.Linear(1, len(probs))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_rescore_multiplies_each_score_by_its_labels_probability(tmp_path, write_bars):
    rescorer = Rescorer(2, [0.5] * 3, [0.25] * 3)
    rescorer.net = FixedLogits([0.8, 0.2])
    outputs = [
        {
            "boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 12.0, 8.0]]),
            "labels": torch.tensor([1, 2]),  # the detector's numbering: class 0 is label 1
            "scores": torch.tensor([0.5, 0.9]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "scores": torch.zeros(0),
        },
    ]
    images = [torch.rand(3, 16, 16), torch.rand(3, 16, 16)]
    rescored = rescorer.rescore(outputs, images)
    torch.testing.assert_close(rescored[0]["scores"], torch.tensor([0.4, 0.18]))
    assert rescored[1]["scores"].shape == (0,)
    torch.testing.assert_close(rescored[0]["boxes"], outputs[0]["boxes"])

    # the same for detections in COCO results format, on a dataset's images
    dataset = write_bars(tmp_path, 2)
    results = [
        {"image_id": 1, "category_id": 2, "bbox": [1, 2, 10, 4], "score": 0.5},
        {"image_id": 0, "category_id": 1, "bbox": [3, 3, 5, 5], "score": 0.25},
    ]
    scores = [r["score"] for r in rescorer.rescore_results(results, dataset)]
    assert scores == pytest.approx([0.1, 0.2])


def test_training_teaches_the_rescorer_to_name_the_boxes(tmp_path, write_bars):
    dataset = write_bars(tmp_path)  # wide bars are one class, tall bars the other
    rescorer, record = train_rescorer(dataset, minutes=5, batch_size=16, lr=0.05, max_steps=40)
    assert record["steps"] == 40 and record["crops"] == 16
    assert rescorer_accuracy(rescorer, dataset) == 1.0
    assert not rescorer.training

    # through a checkpoint: the same classifier, the same probabilities
    payload = {"rescorer": rescorer.payload(record)}
    loaded = rescorer_from_checkpoint(payload)
    x = torch.rand(4, 3, SIDE, SIDE)
    torch.testing.assert_close(loaded(x), rescorer(x))
    assert rescorer_from_checkpoint({}) is None
    del payload["rescorer"]["mean"]
    with pytest.raises(ReslabError, match="--no-rescore"):
        rescorer_from_checkpoint(payload)


def test_the_rate_warms_up_then_anneals_until_the_budget_is_spent(
    tmp_path, write_bars, monkeypatch
):
    clock = [100.0]
    monkeypatch.setattr(budget_module, "now", lambda: clock[0])
    rates = []

    def tick(optimizer, args, kwargs):  # each step takes half a second of the fake clock
        rates.append(optimizer.param_groups[0]["lr"])
        clock[0] += 0.5

    handle = register_optimizer_step_post_hook(tick)
    try:
        _, record = train_rescorer(write_bars(tmp_path), minutes=0.5, batch_size=2, lr=0.1)
    finally:
        handle.remove()
    # 30 s, then no step more: the rate rises for 50 steps and follows the clock down after
    assert record["steps"] == 60 and record["seconds"] == 30.0
    assert rates == [0.1 * warmup_cosine(s, 50, s * 0.5 / 30) for s in range(60)]
    assert rates[50] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 25 / 30)))
    _, record = train_rescorer(write_bars(tmp_path), minutes=0, batch_size=2)
    assert record["steps"] == 0 and math.isnan(record["loss"])
