"""The detection configs: dicts in and out, and the rules checked before any data is read."""

from __future__ import annotations

import json

import pytest

from reslab.engine.detect_config import (
    DetectConfig,
    InferConfig,
    anchor_sizes,
    iou_list,
    scale_factors,
    validate,
    validate_inference,
)
from reslab.errors import ReslabError


def test_a_config_round_trips_through_json_with_its_nested_groups():
    config = DetectConfig.from_dict(
        {
            "data": {"data": "scenes"},
            "model": {"backbone": "resnet18", "rpn": {"anchor_sizes": [16, 32]}},
            "train": {"epochs": 3, "ema": 0.9},
            "warm": {"pretrain_minutes": 1.0},
            "precision": "bf16",
        }
    )
    assert config.model.rpn.anchor_sizes == (16, 32)  # JSON's list back as the declared tuple
    assert config.model.roi_heads.batch_size_per_image == 512  # untouched: detectron2's
    assert config.train.epochs == 3 and config.warm.minutes == 1.0
    again = DetectConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == validate(config)


@pytest.mark.parametrize(
    "values, named",
    [
        ({"epoch": 3}, "['epoch'] for DetectConfig"),
        ({"train": {"epoch": 3}}, "['epoch'] for DetectTrainConfig"),
        ({"model": {"rpn": {"anchors": [8]}}}, "['anchors'] for RPNConfig"),
        ({"flips": True}, "['flips'] for InferConfig"),
    ],
)
def test_unknown_keys_are_refused_at_every_level(values, named):
    kind = InferConfig if "flips" in values else DetectConfig
    with pytest.raises(ReslabError, match=r"unknown config key\(s\) " + named.replace("[", r"\[")):
        kind.from_dict(values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": {"width": 0}}, "--width must be > 0, got 0"),
        ({"model": {"backbone": "resnet7"}}, "--backbone must be one of"),
        ({"model": {"rpn": {"anchor_sizes": [32, 16]}}}, "is not a list of anchor sides"),
        ({"threads": -1}, "--threads must be a whole number >= 0, got -1"),
        ({"precision": "fp16"}, "--precision must be one of ('auto', 'fp32', 'bf16')"),
        ({"train": {"warmup_iters": -1}}, "--warmup-iters must be a whole number >= 0, got -1"),
        ({"train": {"ema": 1.0}}, "--ema must be at least 0 and below 1"),
        ({"warm": {"pretrain_jitter": 0.5}}, "--pretrain-jitter must be at least 0 and below"),
    ],
)
def test_bad_training_values_are_one_line_errors(values, message):
    with pytest.raises(ReslabError) as raised:
        validate(DetectConfig.from_dict(values))
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"precision": "bf16", "int8": True}, "--int8 runs the trunk in fp32"),
        ({"scales": [1.0, 5.0]}, "is not a list of resize factors"),
        ({"score_thresh": 1.5}, "--score-thresh is a class probability, from 0 to 1; got 1.5"),
        ({"nms": 0.0}, "--nms is an IoU above 0 and at most 1; got 0"),
        ({"calibration_images": 0}, "--calibration-images must be a whole number >= 1"),
        ({"threads": -2}, "--threads must be a whole number >= 0, got -2"),
    ],
)
def test_bad_inference_values_are_one_line_errors(values, message):
    with pytest.raises(ReslabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_inference(InferConfig.from_dict(values))


def test_list_flags_parse_and_say_what_works():
    assert anchor_sizes("16,32,64") == (16, 32, 64)
    assert scale_factors("1,1.25") == (1.0, 1.25)
    assert iou_list("0.4,0.5") == (0.4, 0.5)
    for parse, text, example in (
        (anchor_sizes, "16,16", "such as 16,32,64,128"),
        (scale_factors, "1,nan", "such as 1,1.25"),
        (iou_list, "0.5,1.5", "such as 0.4,0.5"),
    ):
        with pytest.raises(ReslabError, match=example):
            parse(text)
