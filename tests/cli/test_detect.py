"""`reslab scenes make` and `reslab detect train|eval|predict` end to end on tiny data."""

from __future__ import annotations

import json
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from reslab.cli import build_parser, main
from reslab.cli import detect as detect_cli
from reslab.data.coco import CocoDetection
from reslab.engine import detect_infer
from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.detect_config import DetectTrainConfig
from reslab.engine.detect_infer import evaluate_detector
from reslab.engine.detection import NonFiniteLoss, train_detector
from reslab.engine.rescore import Rescorer
from reslab.models import create_model
from reslab.models.detection import DetectorConfig, RPNConfig, build_detector

TINY = [  # the paper defaults but for these: the plan has its own tests
    "--recipe",
    "detectron2",
    "--backbone",
    "resnet18",
    "--width",
    "0.25",
    "--batch-size",
    "4",
    "--warmup-iters",
    "2",
    "--rois-per-image",
    "16",
    "--test-proposals",
    "50",
]


def train_on_scenes(scenes, out, epochs: int, *extra: str) -> int:
    """`reslab detect train` on the test scenes with the tiny detector; the exit status."""
    args = ["--data", str(scenes), "--out", str(out), "--epochs", str(epochs)]
    return main(["detect", "train", *args, *extra, *TINY])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    assert main(["scenes", "make", "--out", str(root), "--images", "8", "--size", "64"]) == 0
    return root


def test_train_resume_eval_predict(scenes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train_on_scenes(scenes, out, 1, "--anchor-sizes", "8,16,32") == 0
    printed = capsys.readouterr().out
    for name in ("objectness", "rpn_box_reg", "classifier", "box_reg", "mAP@.5"):
        assert name in printed
    first = load_checkpoint(out)
    assert first["epoch"] == 1 and first["step"] == 2 and first["task"] == "detection"
    # the anchors are part of the model: the checkpoint rebuilds them, and resume keeps them
    assert tuple(first["model"]["kwargs"]["rpn"]["anchor_sizes"]) == (8, 16, 32)
    assert first["class_names"][0] == "T-shirt/top"

    assert train_on_scenes(scenes, out, 2, "--resume") == 0
    second = load_checkpoint(out / "last.pt")
    assert second["epoch"] == 2 and second["step"] == 4
    assert tuple(second["model"]["kwargs"]["rpn"]["anchor_sizes"]) == (8, 16, 32)
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    board = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0})
    board.Reload()  # TensorBoard holds every step of both runs, and each run's first batch
    assert [e.step for e in board.Scalars("step/loss_objectness")] == [1, 2, 3, 4]
    assert [e.step for e in board.Images("train/batch")] == [1, 3]

    metrics = tmp_path / "metrics.json"
    assert main(["detect", "eval", str(out), "--data", str(scenes), "--json", str(metrics)]) == 0
    values = json.loads(metrics.read_text())
    assert 0.0 <= values["mAP"] <= values["mAP50"] <= 1.0 and len(values["per_class"]) == 10
    val = json.loads((scenes / "annotations" / "val.json").read_text())
    assert values["objects"] == len(val["annotations"])
    assert 0 <= values["found"] <= values["objects"]
    assert f"{values['found']:,} of {values['objects']:,} objects found" in capsys.readouterr().out

    # --score-thresh reaches the model: nothing is that sure, everything is at least 0
    counts = {}
    for thresh in ("0", "1"):
        path = tmp_path / f"thresh{thresh}.json"
        evaluate = ["detect", "eval", str(out), "--data", str(scenes), "--json", str(path)]
        assert main([*evaluate, "--score-thresh", thresh]) == 0
        counts[thresh] = json.loads(path.read_text())["detections"]
    assert counts["1"] == 0 < values["detections"] <= counts["0"]
    # --nms reaches the model that is scored (the checkpoint's 0.5 otherwise)
    seen = []

    def scored(model, *args):
        seen.append(model.roi_heads.nms_thresh)
        return evaluate_detector(model, *args)

    monkeypatch.setattr(detect_infer, "evaluate_detector", scored)
    evaluate = ["detect", "eval", str(out), "--data", str(scenes)]
    assert main(evaluate) == 0 and main([*evaluate, "--nms", "0.3"]) == 0
    assert seen == [0.5, 0.3]
    monkeypatch.undo()

    int8 = tmp_path / "int8.json"
    evaluate = ["detect", "eval", str(out), "--data", str(scenes), "--json", str(int8)]
    assert main([*evaluate, "--int8", "--calibration-images", "3"]) == 0
    # calibrated on the train split's first three images, 50 test proposals each
    assert "int8 res5 head calibrated on 3 images (150 RoIs)" in capsys.readouterr().out
    assert 0.0 <= json.loads(int8.read_text())["mAP50"] <= 1.0

    predict_checks(scenes, out, tmp_path, capsys, first["class_names"])


def predict_checks(scenes, out, tmp_path, capsys, class_names: list[str]) -> None:
    """The second half of the test above: predict on the run it trained, then the classifier's
    commands on it."""
    image = scenes / "val" / "000000.png"
    predict = ["detect", "predict", str(out), str(image), "--score-thresh", "0"]
    assert main([*predict, "--out", str(tmp_path / "pred")]) == 0
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert records[0]["image"] == str(image)
    assert (tmp_path / "pred" / "000000.png").is_file()
    assert main([*predict, "--out", str(tmp_path / "pred8"), "--int8"]) == 0
    assert "calibrated on 1 images" in capsys.readouterr().err
    int8_records = json.loads((tmp_path / "pred8" / "predictions.json").read_text())
    assert len(int8_records[0]["detections"]) > 0
    # the mirror-averaged head: boxes inside the 64-pixel image, labels from the scenes
    assert main([*predict, "--out", str(tmp_path / "flip"), "--flip"]) == 0
    flipped = json.loads((tmp_path / "flip" / "predictions.json").read_text())[0]["detections"]
    assert flipped and all(0 <= v <= 64 for d in flipped for v in d["box_xyxy"])
    assert {d["label"] for d in flipped} <= set(class_names)
    # and over a 1.5x view besides: other scores, boxes still in the image's own pixels
    assert main([*predict, "--out", str(tmp_path / "views"), "--flip", "--scales", "1,1.5"]) == 0
    viewed = json.loads((tmp_path / "views" / "predictions.json").read_text())[0]["detections"]
    assert viewed and all(0 <= v <= 64 for d in viewed for v in d["box_xyxy"])
    assert sorted(d["score"] for d in viewed) != sorted(d["score"] for d in flipped)
    # the head run again where it moved the boxes: other boxes and scores, still in the image
    refine = ["--out", str(tmp_path / "refined"), "--flip", "--scales", "1,1.5", "--refine"]
    assert main([*predict, *refine]) == 0
    refined = json.loads((tmp_path / "refined" / "predictions.json").read_text())[0]["detections"]
    assert refined and all(0 <= v <= 64 for d in refined for v in d["box_xyxy"])
    assert sorted(d["box_xyxy"] for d in refined) != sorted(d["box_xyxy"] for d in viewed)

    # the classifier's commands name the detector's instead of failing on a missing key
    capsys.readouterr()
    for command in (["eval", str(out)], ["predict", str(out), str(image)], ["export", str(out)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "holds a detection model (fasterrcnn_c4)" in err and "reslab detect eval" in err
    assert main(["explain", str(out), str(image)]) == 2
    assert "not an image classifier; explain takes image classifiers" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    assert f"detect train --resume --out {out}`" in capsys.readouterr().err


def test_a_new_run_in_a_used_folder_starts_its_own_log(scenes, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 99}\n' * 5)  # an earlier run's steps
    assert train_on_scenes(scenes, out, 1) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_int8_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["detect", "eval", str(tmp_path), "--data", str(tmp_path), "--int8", "--bf16"])
    assert stopped.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    code = main(
        ["detect", "predict", str(tmp_path / "no.pt"), "x.png", "--calibration-images", "0"]
    )
    assert code == 2
    assert "--calibration-images must be a whole number >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, flags, message",
    [
        ("eval", ["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
        ("predict", ["--score-thresh", "2"], "--score-thresh is a class probability"),
        ("predict", ["--score-thresh", "-0.1"], "from 0 to 1; got -0.1"),
        ("eval", ["--score-thresh", "1.5"], "--score-thresh is a class probability"),
        ("eval", ["--nms", "0"], "--nms is an IoU above 0 and at most 1; got 0"),
        ("predict", ["--nms", "1.5"], "--nms is an IoU above 0 and at most 1; got 1.5"),
    ],
)
def test_bad_inference_flags_name_the_flag(command, flags, message, tmp_path, capsys):
    # checked before the checkpoint is read: this one does not exist
    place = ["--data", str(tmp_path)] if command == "eval" else ["x.png"]
    code = main(["detect", command, str(tmp_path / "no.pt"), *place, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_bad_data_is_one_line_and_exit_2(scenes, tmp_path, capsys):
    data = json.loads((scenes / "annotations" / "val.json").read_text())
    data["annotations"][0]["category_id"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code = main(
        [
            "detect",
            "train",
            "--images",
            str(scenes / "val"),
            "--annotations",
            str(bad),
            "--out",
            str(tmp_path / "run"),
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "unknown category id 99" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs must be a whole number >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
        (["--warmup-iters", "-1"], "--warmup-iters must be a whole number >= 0, got -1"),
        (["--min-size", "0"], "--min-size must be a whole number >= 1, got 0"),
        (["--max-size", "-5"], "--max-size must be a whole number >= 1, got -5"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--max-minutes", "-1"], "--max-minutes must be >= 0, got -1.0"),
        (["--rois-per-image", "0"], "--rois-per-image must be >= 1, got 0"),
        (["--roi-positive-fraction", "0"], "--roi-positive-fraction must be in (0, 1], got 0.0"),
        (["--roi-positive-fraction", "1.5"], "in (0, 1], got 1.5"),
        (["--train-pre-nms", "0"], "--train-pre-nms must be >= 1, got 0"),
        (["--train-proposals", "-3"], "--train-proposals must be >= 1, got -3"),
        (["--test-proposals", "0"], "--test-proposals must be >= 1, got 0"),
        (["--pretrain-minutes", "-1"], "--pretrain-minutes must be >= 0, got -1"),
        (["--pretrain-jitter", "0.5"], "--pretrain-jitter must be at least 0 and below 0.5"),
        (["--ema", "1"], "--ema must be at least 0 and below 1 (such as 0.999), got 1"),
        (["--pretrain-minutes", "1", "--resume"], "--resume continues one: give one"),
        (
            ["--pretrain-minutes", "5", "--max-minutes", "5"],
            "(5 together) must be less than --max-minutes (5)",
        ),
        (["--rescore-minutes", "-1"], "--rescore-minutes must be >= 0, got -1"),
        (["--rescore-minutes", "1", "--resume"], "--rescore-minutes starts a run; --resume"),
        (
            ["--rescore-minutes", "2", "--pretrain-minutes", "3", "--max-minutes", "5"],
            "--pretrain-minutes and --rescore-minutes (5 together) must be less than "
            "--max-minutes (5)",
        ),
    ],
)
def test_bad_roi_sampling_names_the_flag(flags, message, scenes, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["detect", "train", "--data", str(scenes), "--out", str(out), *TINY, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()  # refused before anything was written


def test_roi_positive_fraction_reaches_the_sampler(scenes, tmp_path):
    out = tmp_path / "run"
    assert train_on_scenes(scenes, out, 1, "--roi-positive-fraction", "0.5") == 0
    saved = load_checkpoint(out / "last.pt")["model"]["kwargs"]["roi_heads"]
    assert saved["positive_fraction"] == 0.5 and saved["batch_size_per_image"] == 16


def test_pretraining_warm_starts_the_detector(scenes, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train_on_scenes(scenes, out, 1, "--pretrain-minutes", "0.01", "--pretrain-jitter", "0.1")
        == 0
    )
    boxes = len(json.loads((scenes / "annotations" / "train.json").read_text())["annotations"])
    assert f"pretraining the box classifier on {boxes:,} ground-truth crops" in (
        capsys.readouterr().out
    )
    saved = torch.load(out / "pretrained.pt", weights_only=True)
    assert saved["pretrain"]["crops"] == boxes and saved["pretrain"]["steps"] > 0
    # detection training started from the pretrained weights, not from a fresh seeded model
    name = "backbone.conv1.weight"
    trained = load_checkpoint(out / "last.pt")["state_dict"][name]
    torch.manual_seed(0)
    fresh = build_detector(DetectorConfig.from_dict(load_checkpoint(out)["model"]["kwargs"]))
    from_pretrained = (trained - saved["state_dict"][name]).abs().max()
    assert from_pretrained < (trained - fresh.state_dict()[name]).abs().max()


def test_rescorer_rides_in_the_checkpoint_and_rescores_eval_and_predict(
    scenes, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert train_on_scenes(scenes, out, 1, "--rescore-minutes", "0.02") == 0
    boxes = len(json.loads((scenes / "annotations" / "train.json").read_text())["annotations"])
    assert f"training the rescoring classifier on {boxes:,} ground-truth crops" in (
        capsys.readouterr().out
    )
    saved = load_checkpoint(out / "last.pt")["rescorer"]
    assert saved["record"]["crops"] == boxes and saved["num_classes"] == 10
    # a resumed run keeps it
    assert train_on_scenes(scenes, out, 2, "--resume") == 0
    kept = load_checkpoint(out / "last.pt")
    assert kept["epoch"] == 2
    torch.testing.assert_close(kept["rescorer"]["state_dict"], saved["state_dict"])

    # eval scores with it unless --no-rescore
    given = []

    def scored(*args):
        given.append(args[-1])
        return evaluate_detector(*args)

    monkeypatch.setattr(detect_infer, "evaluate_detector", scored)
    evaluate = ["detect", "eval", str(out), "--data", str(scenes)]
    assert main(evaluate) == 0 and main([*evaluate, "--no-rescore"]) == 0
    assert isinstance(given[0], Rescorer) and given[1] is None
    assert "rescored by the checkpoint's classifier" in capsys.readouterr().out
    monkeypatch.undo()

    # predict: each score is the detector's times the classifier's probability of its label;
    # fp32 in both, since auto precision times each run and may pick bf16 in one of them
    image = scenes / "val" / "000000.png"
    found = {}
    for name, flags in (("rescored", []), ("own", ["--no-rescore"])):
        predict = ["detect", "predict", str(out), str(image), "--score-thresh", "0", *flags]
        predict += ["--precision", "fp32"]
        assert main([*predict, "--out", str(tmp_path / name)]) == 0
        [record] = json.loads((tmp_path / name / "predictions.json").read_text())
        found[name] = record["detections"]
    own = {(d["label"], tuple(d["box_xyxy"])): d["score"] for d in found["own"]}
    rescored = {(d["label"], tuple(d["box_xyxy"])): d["score"] for d in found["rescored"]}
    assert own.keys() == rescored.keys() and own
    assert all(rescored[key] <= own[key] + 1e-4 for key in own)
    assert any(rescored[key] < own[key] - 1e-3 for key in own)


def test_ema_flag_averages_the_detectors_weights_and_batch_norm(scenes, tmp_path):
    out = tmp_path / "run"
    assert train_on_scenes(scenes, out, 1, "--ema", "0.9") == 0
    kept = load_checkpoint(out / "last.pt")
    assert kept["train_config"]["ema"] == 0.9
    averaged, raw = kept["state_dict"], kept["train_state_dict"]
    assert averaged.keys() == raw.keys()
    for name in ("backbone.conv1.weight", "backbone.bn1.running_mean"):
        assert not torch.equal(averaged[name], raw[name])
    # the statistics are averaged too, not left at their initial zeros
    assert averaged["backbone.bn1.running_mean"].abs().sum() > 0
    # eval loads the averaged weights
    assert main(["detect", "eval", str(out), "--data", str(scenes)]) == 0


def test_training_proposal_flags_reach_the_rpn(scenes, tmp_path):
    out = tmp_path / "run"
    assert train_on_scenes(scenes, out, 1, "--train-pre-nms", "60", "--train-proposals", "30") == 0
    rpn = load_checkpoint(out / "last.pt")["model"]["kwargs"]["rpn"]
    assert (rpn["pre_nms_top_n_train"], rpn["post_nms_top_n_train"]) == (60, 30)
    assert rpn["pre_nms_top_n_test"] == RPNConfig.pre_nms_top_n_test  # test side untouched


@pytest.mark.parametrize("value", ["16,x", "32,16", "0,16", ""])
def test_bad_anchor_sizes_name_the_flag_and_what_works(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["detect", "train", "--data", str(tmp_path), "--anchor-sizes", value])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "--anchor-sizes" in err and "such as 16,32,64,128" in err


@pytest.mark.parametrize("value", ["1,x", "0", "1,-1", "5", ""])
def test_bad_test_scales_name_the_flag_and_what_works(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["detect", "eval", str(tmp_path), "--data", str(tmp_path), "--scales", value])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "--scales" in err and "such as 1,1.25" in err


class NaNAfter(nn.Module):
    """Stands in for a detector: finite losses for ``good`` steps, then NaN."""

    spec = {"name": "fasterrcnn_c4", "kwargs": {}}

    def __init__(self, good: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.good = good
        self.calls = 0
        self.seen: list[float] = []

    def forward(self, images, targets):
        self.calls += 1
        self.seen.append(float(self.weight.detach()))  # the weights the last step left
        value = self.weight * (1.0 if self.calls <= self.good else float("nan"))
        return {"loss_classifier": value, "loss_box_reg": value * 0.5}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(scenes, tmp_path):
    dataset = CocoDetection(scenes / "train", scenes / "annotations" / "train.json")
    config = DetectTrainConfig(epochs=3, batch_size=4, warmup_iters=1)
    model = NaNAfter(good=3)  # two steps per epoch: epoch 1 is good, epoch 2 breaks
    with pytest.raises(NonFiniteLoss, match="non-finite loss_classifier, loss_box_reg at step 3"):
        train_detector(model, dataset, config, tmp_path)
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1 and kept["step"] == 2
    assert torch.isfinite(kept["state_dict"]["weight"])


def test_ema_checkpoints_hold_the_average_and_resume_continues_it(scenes, tmp_path):
    dataset = CocoDetection(scenes / "train", scenes / "annotations" / "train.json")
    config = DetectTrainConfig(epochs=2, batch_size=4, warmup_iters=1, ema=0.5)
    model = NaNAfter(good=10**9)  # two steps per epoch
    train_detector(model, dataset, config, tmp_path / "straight")
    kept = load_checkpoint(tmp_path / "straight" / "last.pt")
    raw = float(kept["train_state_dict"]["weight"])
    # by hand: the first step's weights, then each later step's pulled in at half weight
    after_steps = [*model.seen[1:], raw]
    average = after_steps[0]
    for weight in after_steps[1:]:
        average = 0.5 * average + 0.5 * weight
    assert len(after_steps) == 4 and average != pytest.approx(raw)
    assert float(kept["state_dict"]["weight"]) == pytest.approx(average)
    assert float(model.weight) == pytest.approx(average)  # the model returns averaged

    # stopped after the first epoch, then resumed: the same average as the straight run
    with pytest.raises(NonFiniteLoss):
        train_detector(NaNAfter(good=2), dataset, config, tmp_path / "resumed")
    train_detector(NaNAfter(good=10**9), dataset, config, tmp_path / "resumed", resume=True)
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["step"] == 4
    for key in ("state_dict", "train_state_dict"):
        assert float(resumed[key]["weight"]) == pytest.approx(float(kept[key]["weight"]))


def test_time_budget_stops_the_run_with_a_checkpoint(scenes, tmp_path):
    dataset = CocoDetection(scenes / "train", scenes / "annotations" / "train.json")
    config = DetectTrainConfig(epochs=10_000, batch_size=4, warmup_iters=1, max_minutes=0.002)
    started = time.monotonic()
    train_detector(NaNAfter(good=10**9), dataset, config, tmp_path)
    assert time.monotonic() - started < 30
    kept = load_checkpoint(tmp_path / "last.pt")
    assert 1 <= kept["step"] < 2 * config.epochs and kept["epoch"] < config.epochs


def test_backbone_weights_load_and_freeze(scenes, tmp_path, capsys):
    # torchvision's own resnet18 loads in tests/models; a quarter-width twin with the same
    # names keeps this end-to-end run cheap
    weights = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", width=0.25).state_dict(), weights)
    out = tmp_path / "run"
    assert train_on_scenes(scenes, out, 1, "--backbone-weights", str(weights)) == 0
    assert "unused: fc.weight, fc.bias" in capsys.readouterr().out
    payload = load_checkpoint(out)
    config = payload["model"]["kwargs"]
    assert config["frozen_bn"] and config["freeze_at"] == 2
    state = torch.load(weights, weights_only=True)
    # frozen stem: unchanged by training
    assert torch.equal(payload["state_dict"]["backbone.conv1.weight"], state["conv1.weight"])
    assert not torch.equal(
        payload["state_dict"]["backbone.layer2.0.conv1.weight"], state["layer2.0.conv1.weight"]
    )


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize(
    "launcher, flags", [(TORCHRUN, []), ([], ["--processes", "2"])], ids=["torchrun", "processes"]
)
def test_two_processes(scenes, tmp_path, launcher, flags):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [
        sys.executable, *launcher,
        "-m", "reslab", "detect", "train", "--data", str(scenes), "--out", str(out),
        "--epochs", "1", "--threads", "1", *TINY, *flags,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2; global batch 4 (2 per process)" in result.stdout
    assert result.stdout.count("checkpoint:") == 1  # rank 1 prints nothing
    saved = load_checkpoint(out / "last.pt")
    # 8 training scenes in global batches of 4: 2 steps, the same count as one process
    assert saved["epoch"] == 1 and saved["step"] == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def parsed(argv: list[str]):
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args


TRAIN = ["detect", "train", "--data", "scenes"]
EVAL = ["detect", "eval", "run", "--data", "scenes"]
PREDICT = ["detect", "predict", "run", "x.png"]


@pytest.mark.parametrize(
    "command, config",
    [
        (TRAIN, detect_cli.train_config),
        (EVAL, detect_cli.inference_config),
        (PREDICT, detect_cli.inference_config),
    ],
)
def test_precision_flag_and_its_deprecated_bf16_alias(command, config, capsys):
    assert config(parsed(command)).precision == "auto"
    assert config(parsed([*command, "--precision", "fp32"])).precision == "fp32"
    assert capsys.readouterr().err == ""
    assert config(parsed([*command, "--bf16"])).precision == "bf16"
    assert capsys.readouterr().err == "reslab: --bf16 is deprecated; use --precision bf16\n"
    with pytest.raises(SystemExit) as stopped:
        parsed([*command, "--bf16", "--precision", "fp32"])
    assert stopped.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_bf16_is_hidden_from_help(capsys):
    for command in (TRAIN, EVAL, PREDICT):
        with pytest.raises(SystemExit):
            parsed([*command[:2], "--help"])
        shown = capsys.readouterr().out
        assert "--precision {auto,fp32,bf16}" in shown and "--bf16" not in shown


def test_eval_passes_the_precision_and_views_to_the_engine(monkeypatch):
    given = []
    monkeypatch.setattr(
        detect_cli, "evaluate_checkpoint", lambda config, console: given.append(config)
    )
    flags = ["--precision", "bf16", "--flip", "--scales", "1,1.5", "--no-rescore", "--nms", "0.4"]
    assert main([*EVAL, *flags]) == 0
    [config] = given
    assert (config.precision, config.flip, config.scales) == ("bf16", True, (1.0, 1.5))
    assert (config.rescore, config.nms, config.data.data) == (False, 0.4, "scenes")


@pytest.mark.parametrize(
    "command, flags, message",
    [
        (TRAIN, ["--threads", "-1"], "--threads must be a whole number >= 0, got -1"),
        (TRAIN, ["--width", "0"], "--width must be > 0, got 0.0"),
        (PREDICT, ["--threads", "-2"], "--threads must be a whole number >= 0, got -2"),
        (EVAL, ["--int8", "--scales", "1"], None),
    ],
)
def test_new_rules_are_one_line_errors(command, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(detect_cli, "evaluate_checkpoint", lambda config, console: None)
    code = main([*command, *flags])
    err = capsys.readouterr().err
    if message is None:  # allowed: the int8 head with the default precision
        assert code == 0, err
        return
    assert code == 2 and message in err and err.count("\n") == 1, err
