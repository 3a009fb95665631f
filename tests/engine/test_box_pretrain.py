"""Warm start of the C4 detector's classifier on ground-truth crops."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from reslab.engine import box_pretrain
from reslab.engine.box_pretrain import (
    box_crops,
    crop_accuracy,
    detector_scale,
    jitter_boxes,
    pretrain_box_classifier,
)
from reslab.errors import ReslabError
from reslab.models.detection import DetectorConfig, build_detector


def test_crops_centre_each_box_with_a_margin(tmp_path, write_bars):
    crops, boxes, labels = box_crops(write_bars(tmp_path, 4), side=64, margin=0.25)
    assert crops.shape == (4, 3, 64, 64) and crops.dtype == torch.uint8
    assert labels.tolist() == [1, 2, 1, 2]
    # the 24-pixel side fills 64 / 1.5 of the crop, centred; the 8-pixel side a third of that
    long, short = 64 / 1.5, 64 / 1.5 / 3
    wide = torch.tensor([32 - long / 2, 32 - short / 2, 32 + long / 2, 32 + short / 2])
    torch.testing.assert_close(boxes[0], wide, atol=1e-3, rtol=0)
    torch.testing.assert_close(boxes[1], wide[[1, 0, 3, 2]], atol=1e-3, rtol=0)
    x1, y1, x2, y2 = (int(v) for v in boxes[0])
    assert crops[0, :, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].min() > 200  # the bar
    assert crops[0, :, : y1 - 2].max() < 30 and crops[0, :, y2 + 2 :].max() < 30  # around it


def test_crops_at_the_detectors_scale_keep_each_objects_size(tmp_path, write_bars):
    dataset = write_bars(tmp_path, 2)  # 64-pixel images, a 24x8 bar and an 8x24 one
    # a detector at 128 pixels doubles the images: a 128-pixel crop is a 64-pixel window of
    # the image, the bar 48x16 in its middle, black around it
    crops, boxes, _ = box_crops(dataset, side=128, size=(128, 128))
    middle = torch.tensor([40.0, 56.0, 88.0, 72.0])
    torch.testing.assert_close(boxes[0], middle, atol=1e-3, rtol=0)
    torch.testing.assert_close(boxes[1], middle[[1, 0, 3, 2]], atol=1e-3, rtol=0)
    assert crops[0, :, 58:70, 42:86].min() > 200 and crops[0, :, :54].max() < 30
    # an object larger than that window is fitted into the crop with its margin, as without size
    _, fitted, _ = box_crops(dataset, side=16, size=(64, 64))
    torch.testing.assert_close(fitted, box_crops(dataset, side=16)[1])
    # torchvision's rule: the short side to min_size unless the long side passes max_size
    assert detector_scale(100, 200, (50, 1000)) == 0.5
    assert detector_scale(100, 200, (50, 80)) == 0.4


def test_pretraining_teaches_the_head_to_name_the_boxes(tmp_path, write_bars):
    dataset = write_bars(tmp_path)
    torch.manual_seed(0)
    model = build_detector(
        DetectorConfig(backbone="resnet18", width=0.25, num_classes=3, min_size=64, max_size=64)
    )
    crops, boxes, labels = box_crops(dataset)
    before = crop_accuracy(model, crops, boxes, labels)
    result = pretrain_box_classifier(model, dataset, minutes=5, batch_size=8, lr=0.05, max_steps=40)
    assert result["steps"] == 40 and result["crops"] == 16
    assert crop_accuracy(model, crops, boxes, labels) == 1.0 > before
    assert model.training


def test_bf16_pretraining_runs_the_head_under_bf16_autocast(tmp_path, monkeypatch, write_bars):
    dataset = write_bars(tmp_path)
    torch.manual_seed(0)
    model = build_detector(
        DetectorConfig(backbone="resnet18", width=0.25, num_classes=3, min_size=64, max_size=64)
    )
    seen, crop_logits = [], box_pretrain.crop_logits

    def spy(*args):
        logits = crop_logits(*args)
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype))
        return logits

    monkeypatch.setattr(box_pretrain, "crop_logits", spy)
    result = pretrain_box_classifier(
        model, dataset, minutes=5, batch_size=8, lr=0.05, max_steps=2, bf16=True
    )
    assert seen == [(True, torch.bfloat16)] * 2
    assert math.isfinite(result["loss"])
    seen.clear()
    pretrain_box_classifier(model, dataset, minutes=5, batch_size=8, lr=0.05, max_steps=1)
    assert seen == [(False, torch.float32)]


def test_no_boxes_is_a_one_line_error(tmp_path, write_bars):
    dataset = write_bars(tmp_path, 2)
    dataset.annotations = {key: [] for key in dataset.annotations}
    with pytest.raises(ReslabError, match="no boxes"):
        box_crops(dataset)


def test_jittered_boxes_stay_near_their_box_and_inside_the_crop():
    boxes = torch.tensor(
        [[10.0, 20.0, 50.0, 30.0], [0.0, 0.0, 64.0, 64.0], [30.0, 30.0, 31.0, 31.0]]
    )
    g = torch.Generator().manual_seed(0)
    moved = torch.cat([jitter_boxes(boxes, 0.1, 64, g) for _ in range(200)])
    again = boxes.repeat(200, 1)
    assert not torch.equal(moved, again)  # they do move
    assert moved.min() >= 0 and moved.max() <= 64
    assert (moved[:, 2:] - moved[:, :2] >= 1 - 1e-6).all()
    # each edge moves at most a tenth of its side, so IoU with the box stays high
    size = (again[:, 2:] - again[:, :2]).repeat(1, 2)
    assert ((moved - again).abs() <= 0.1 * size + 1e-5).all()
    assert box_iou(moved[:3], boxes).diag().min() > 0.6
    assert torch.equal(jitter_boxes(boxes, 0.0, 64, g), boxes)
