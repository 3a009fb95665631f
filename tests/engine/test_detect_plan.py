"""The detection recipe planned from the data and the machine: its plumbing on tiny sets, and
the bad input it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import write_png

from reslab.cli import build_parser, main
from reslab.cli import detect as detect_cli
from reslab.data.coco import CocoDetection
from reslab.engine import detect_train
from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.detect_plan import (
    WARMUP_MOST,
    DataStats,
    anchors,
    data_stats,
    fit_schedule,
    input_size,
    log_kmeans,
    make_plan,
)
from reslab.errors import ReslabError


def write_set(root, boxes_per_image, size=64, categories=((7, "wide"), (42, "tall"))) -> tuple:
    """A COCO set of black images with white boxes: ``boxes_per_image`` is a list per image of
    (x, y, w, h, category id); an empty list is an empty image."""
    import torch

    images, annotations = [], []
    for i, boxes in enumerate(boxes_per_image):
        pixels = torch.zeros(3, size, size, dtype=torch.uint8)
        for x, y, w, h, category in boxes:
            pixels[:, y : y + h, x : x + w] = 255
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 10 * i,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                }
            )
        write_png(pixels, str(root / f"{i}.png"))
        images.append({"id": 10 * i, "file_name": f"{i}.png", "width": size, "height": size})
    cats = [{"id": c, "name": n} for c, n in categories]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return root, path


def bars(count: int, empty: int = 0):
    """Wide (24x8, id 7) and tall (8x24, id 42) bars, one per image, then ``empty`` images."""
    out = []
    for i in range(count):
        x, y = 4 + 5 * (i % 6), 6 + 3 * (i % 5)
        out.append([(x, y, 24, 8, 7)] if i % 2 == 0 else [(x, y, 8, 24, 42)])
    return out + [[] for _ in range(empty)]


def test_anchors_come_from_the_boxes(tmp_path):
    small = data_stats(CocoDetection(*write_set(tmp_path, bars(6))))
    # 24x8 and 8x24: one side, sqrt(192), at the planned scale; the two ratios
    min_size, _ = 256, 256
    sizes, ratios = anchors(small, min_size, 256)
    assert sizes == (round(192**0.5 * 4),) and ratios == (0.33, 3.0)
    # twice the boxes, twice the anchors
    big = DataStats(**{**small.__dict__, "box_sides": [2 * s for s in small.box_sides]})
    assert anchors(big, 256, 256)[0] == (round(2 * 192**0.5 * 4),)
    # two clusters of sides, far apart: one anchor for each
    assert [round(c) for c in log_kmeans([10, 11, 12, 80, 88, 96], 2)] == [11, 88]


def stats_of(short: int, box: float) -> DataStats:
    return DataStats(2, 0, [short, short], [short, short], [box, box], [1.0, 1.0], [0, 1], [1, 1])


def test_input_size_fits_the_objects_and_the_cpu():
    # the median box to 64 px: the 128-px scenes' 32-px items at 256
    assert input_size(stats_of(128, 32), "cuda") == (256, 256)
    assert input_size(stats_of(128, 32)) == (256, 256)
    # never below the images' own size
    assert input_size(stats_of(200, 100)) == (224, 224)
    # on the CPU at most 320, unless the median box would fall under 32 px
    assert input_size(stats_of(192, 27), "cuda") == (480, 480)
    assert input_size(stats_of(192, 27)) == (320, 320)
    assert input_size(stats_of(192, 12)) == (512, 512)


def test_warm_up_fits_the_steps_the_budget_allows():
    for minutes, step in ((0.5, 0.5), (2, 0.1), (600, 0.1)):
        plan = fit_schedule(minutes, 0, step, 10)
        steps = plan["steps_allowed"]
        assert steps == int(minutes * 60 * 0.95 / step)
        assert 1 <= plan["warmup_iters"] <= min(WARMUP_MOST, max(1, steps // 10))
        assert plan["epochs"] * 10 >= 10 * steps  # the budget, not the epochs, ends the run
    # the warm starts' minutes come out of the steps
    assert fit_schedule(10, 5, 1.0, 10)["steps_allowed"] == int(10 * 60 * 0.95 - 300)


def parsed(argv):
    args = build_parser().parse_args(["detect", "train", *argv])
    args.argv = argv
    return args


def test_flags_given_override_their_part_of_the_plan(tmp_path):
    images, annotations = write_set(tmp_path, bars(8))
    argv = ["--images", str(images), "--annotations", str(annotations), "--max-minutes", "1"]
    config = detect_cli.train_config(parsed([*argv, "--anchor-sizes", "8,16", "--lr", "0.05"]))
    assert set(config.plan.explicit) == {"anchor_sizes", "lr"}
    dataset = CocoDetection(images, annotations)
    planned, record = make_plan(config, dataset, cores=2, measure=lambda c: 0.5)
    assert planned.model.rpn.anchor_sizes == (8, 16) and planned.train.lr == 0.05
    assert record["values"]["anchor_sizes"] == [8, 16]
    # the rest is the plan's, not detectron2's
    assert planned.model.rpn.aspect_ratios == (0.33, 3.0)
    assert planned.model.roi_heads.batch_size_per_image == 8
    assert planned.train.warmup_iters == round(0.05 * int(60 * 0.95 / 0.5))
    # --recipe detectron2 keeps the paper defaults
    paper = detect_cli.train_config(parsed([*argv, "--recipe", "detectron2"]))
    assert paper.plan.recipe == "detectron2" and paper.model.rpn.anchor_sizes[-1] == 512


def run_train(tmp_path, monkeypatch, images, annotations, *flags):
    monkeypatch.setattr(detect_train, "step_seconds", lambda config, precision, world: 0.01)
    tiny = ["--width", "0.25", "--min-size", "64", "--max-size", "64", "--precision", "fp32"]
    argv = ["detect", "train", "--images", str(images), "--annotations", str(annotations)]
    return main([*argv, "--out", str(tmp_path / "run"), *tiny, *flags])


def test_category_names_and_ids_survive_into_predict(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    images, annotations = write_set(data, bars(8, empty=2))
    flags = ("--epochs", "1", "--val-fraction", "0.25")
    assert run_train(tmp_path, monkeypatch, images, annotations, *flags) == 0
    printed = capsys.readouterr().out
    assert "the recipe planned" in printed and "mAP@.5" in printed and "mAP@[.5:.95]" in printed
    assert "steps/s" in printed
    run = tmp_path / "run"
    payload = load_checkpoint(run / "last.pt")
    assert payload["plan"]["values"]["anchor_ratios"] == [0.33, 3.0]
    assert json.loads((run / "plan.json").read_text())["explicit"] == [
        "width",
        "min_size",
        "max_size",
        "epochs",
    ]
    assert payload["class_names"] == ["wide", "tall"] and payload["category_ids"] == [7, 42]
    out = tmp_path / "preds"
    predict = ["detect", "predict", str(run), str(images / "0.png"), "--out", str(out)]
    assert main([*predict, "--score-thresh", "0"]) == 0
    [record] = json.loads((out / "predictions.json").read_text())
    assert record["detections"]
    for detection in record["detections"]:
        assert (detection["label"], detection["category_id"]) in {("wide", 7), ("tall", 42)}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("reslab: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[], []], "no annotations at all"),
        ([[(0, 0, 70, 8, 7)]], "is larger than its 64x64 image"),
    ],
)
def test_bad_sets_are_one_line_errors(boxes, message, tmp_path, monkeypatch, capsys):
    images, annotations = write_set(tmp_path, boxes)
    assert run_train(tmp_path, monkeypatch, images, annotations) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_image_listed_twice_is_refused(tmp_path, monkeypatch, capsys):
    images, annotations = write_set(tmp_path, bars(2))
    data = json.loads(annotations.read_text())
    data["images"].append({**data["images"][0], "id": 99})
    annotations.write_text(json.dumps(data))
    assert run_train(tmp_path, monkeypatch, images, annotations) == 2
    assert "lists 0.png again (image 0 has it)" in one_line_error(capsys)


def test_a_category_without_boxes_is_a_warning(tmp_path, monkeypatch, capsys):
    cats = ((7, "wide"), (42, "tall"), (5, "round"))
    images, annotations = write_set(tmp_path, bars(4), categories=cats)
    assert run_train(tmp_path, monkeypatch, images, annotations, "--epochs", "1") == 0
    assert "warning: " in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run")["class_names"] == ["round", "wide", "tall"]


def test_a_budget_too_short_for_one_step_is_one_line(tmp_path, monkeypatch, capsys):
    images, annotations = write_set(tmp_path, bars(4))
    monkeypatch.setattr(detect_train, "step_seconds", lambda config, precision, world: 30.0)
    argv = ["detect", "train", "--images", str(images), "--annotations", str(annotations)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--max-minutes", "0.2"]) == 2
    err = one_line_error(capsys)
    assert "--max-minutes 0.2: one training step takes about 30.0s here" in err
    assert not (tmp_path / "run").exists()


def test_no_boxes_to_plan_from_is_an_error(tmp_path):
    images, annotations = write_set(tmp_path, bars(2))
    data = json.loads(annotations.read_text())
    for ann in data["annotations"]:
        ann["iscrowd"] = 1
    annotations.write_text(json.dumps(data))
    # the set is refused when it is read, before any planning
    with pytest.raises(ReslabError, match="crowd regions .* no object to learn from"):
        data_stats(CocoDetection(images, annotations))


def test_a_grey_classification_run_warm_starts_the_planned_detector(tmp_path, monkeypatch, capsys):
    from reslab.engine.checkpoint import make_payload, save_checkpoint
    from reslab.models import create_model

    # a Fashion-MNIST-like classifier: one input channel, half width
    classifier = create_model("resnet18", width=0.5, in_channels=1, num_classes=10)
    save_checkpoint(tmp_path / "cls" / "last.pt", make_payload(classifier))
    data = tmp_path / "data"
    data.mkdir()
    images, annotations = write_set(data, bars(4))
    flags = ("--epochs", "1", "--backbone-weights", str(tmp_path / "cls"))
    monkeypatch.setattr(detect_train, "step_seconds", lambda config, precision, world: 0.01)
    argv = ["detect", "train", "--images", str(images), "--annotations", str(annotations)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--min-size", "64", *flags]) == 0
    assert "reslab checkpoint of resnet18" in capsys.readouterr().out
    payload = load_checkpoint(tmp_path / "run")
    config = payload["model"]["kwargs"]
    # the plan takes the weights' network and detectron2's rate, and freezes as detectron2
    assert (config["backbone"], config["width"]) == ("resnet18", 0.5)
    assert payload["train_config"]["lr"] == 0.02
    assert config["frozen_bn"] and config["freeze_at"] == 2
    grey = classifier.state_dict()["conv1.weight"]
    stem = payload["state_dict"]["backbone.conv1.weight"]
    # the grey filters spread over RGB (timm's adapt_input_conv), and frozen
    assert stem.shape[1] == 3 and torch.allclose(stem.sum(dim=1), grey[:, 0], atol=1e-6)


def test_the_progress_line_names_the_phase_of_the_schedule():
    from reslab.engine.detection import phase

    assert phase(0, 5, 0.0) == phase(4, 5, 0.9) == "warm-up"
    assert phase(5, 5, 0.49) == "main"  # the cosine's first half
    assert phase(5, 5, 0.5) == "anneal"  # its second, below half the peak rate
