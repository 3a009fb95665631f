import json
import shutil

import pytest
import torch
from PIL import Image

from reslab.cli import build_parser, main
from reslab.cli.train import config_from_args
from reslab.data.sources import fashion_mnist_source
from reslab.data.transforms import InputSpec
from reslab.engine import inference
from reslab.engine.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.engine.config import PRESETS, parse_overrides, train_flags
from reslab.engine.evaluate import logits
from reslab.engine.target import target_reached
from reslab.errors import ReslabError

TINY = [
    "--model", "resnet20", "--width", "0.25", "--image-size", "16", "--epochs", "2",
    "--batch-size", "8", "--lr", "0.05", "--no-verify", "--processes", "1",
    "--precision", "fp32",
]  # fmt: skip


def train(fake_fmnist, out, *extra):
    return main(["train", *TINY, "--data-dir", str(fake_fmnist), "--out", str(out), *extra])


def test_train_eval_predict(fake_fmnist, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert train(fake_fmnist, run, "--optimizer", "adamw", "--schedule", "cosine") == 0
    out = capsys.readouterr().out
    assert "data: Fashion-MNIST from" in out and "optimizer: adamw" in out
    assert "epoch   2/2  train loss" in out and "lr " in out
    assert "━" not in out  # no progress bar when stdout is not a terminal
    assert f"run folder {run}, took" in out and "test accuracy" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model_kwargs"] == {"stem": "small", "width": 0.25} and config["epochs"] == 2

    # eval: the printed accuracy equals a computation by hand from the checkpoint
    assert main(["eval", str(run / "last.pt")]) == 0
    printed = capsys.readouterr().out
    payload = load_checkpoint(run / "last.pt")
    model = model_from_checkpoint(payload).eval()
    source = fashion_mnist_source(str(fake_fmnist), verify=False)
    spec = InputSpec.from_dict(payload["input"])
    cfg = payload["config"]
    out_logits = logits(model, source.test_images, spec, cfg["precision"], True, tta=True)
    predictions = out_logits.argmax(1)
    accuracy = int((predictions == source.test_labels).sum()) / len(predictions)
    assert f"test accuracy {100 * accuracy:.2f}%" in printed
    assert payload["test_accuracy"] == accuracy
    # --tta-shift overrides the checkpoint's views: the mirror and four moves of one pixel
    assert main(["eval", str(run / "last.pt"), "--tta-shift", "1"]) == 0
    shifted_out = capsys.readouterr().out
    shifted_logits = logits(model, source.test_images, spec, "fp32", True, tta=True, shift=1)
    shifted_acc = (shifted_logits.argmax(1) == source.test_labels).double().mean().item()
    assert f"test accuracy {100 * shifted_acc:.2f}%" in shifted_out
    assert "10 test-time views each" in shifted_out and "2 test-time views each" in printed
    assert main(["eval", str(run / "last.pt"), "--tta-shift", "-1"]) == 2
    assert "--tta-shift must be a whole number >= 0, got -1" in capsys.readouterr().err
    sneaker = 7
    in_class = source.test_labels == sneaker
    n_right = int((predictions[in_class] == sneaker).sum())
    assert (
        f"{100 * n_right / int(in_class.sum()):.1f}" in printed.split("7 Sneaker")[1].split("\n")[0]
    )

    # predict: any size and mode, and a one-line error naming a corrupt file
    Image.new("RGBA", (100, 60), (10, 200, 30, 255)).save(tmp_path / "big.png")
    Image.new("L", (28, 28), 128).save(tmp_path / "gray.jpg")
    assert main(["predict", str(run), str(tmp_path / "big.png"), str(tmp_path / "gray.jpg"),
                 "--top-k", "2"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{tmp_path / 'big.png'}: ")
    assert lines[0].count("%") == 2
    # files are read and classified a batch at a time, with the answers of one batch of all
    calls = []
    monkeypatch.setattr(inference, "logits", lambda *a, **k: calls.append(1) or logits(*a, **k))
    files = [str(tmp_path / "big.png"), str(tmp_path / "gray.jpg")] * 2
    whole = inference.predict_files(payload, files, 2, "fp32")
    singly = inference.predict_files(payload, files, 2, "fp32", batch_size=1)
    assert len(calls) == 1 + 4 and len(singly) == 4
    for a, b in zip(whole, singly, strict=True):
        assert [n for n, _ in a] == [n for n, _ in b]
        assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-5)
    with pytest.raises(ReslabError, match=r"image .*missing\.png does not exist"):
        inference.predict_files(payload, [*files, str(tmp_path / "missing.png")])
    assert len(calls) == 5  # the missing file stopped it before any image was classified
    moved = inference.predict_files(payload, files[:2], 2, "fp32", shift=1)
    assert [p for _, p in moved[0]] != pytest.approx([p for _, p in whole[0]], abs=1e-5)
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["predict", str(run), str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt: not a readable image" in err


def test_resume_from_cli_keeps_config(fake_fmnist, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(fake_fmnist, run, "--epochs", "1", "--ema", "0.5") == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--lr", "1"]) == 2
    assert "only --epochs and --device may change (got --lr)" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "after epoch 1" in out
    payload = load_checkpoint(run / "last.pt")
    assert payload["epoch"] == 2 and payload["config"]["ema"] == 0.5
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_bad_flags_are_one_line_errors(fake_fmnist, tmp_path, capsys):
    for flags, message in (
        (["--epochs", "-1"], "--epochs must be a whole number >= 1"),
        (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--crop-padding", "-1"], "--crop-padding must be a whole number >= 0"),
        (["--clean-epochs", "-2"], "--clean-epochs must be a whole number >= 0"),
        (["--warmup", "1"], "--warmup must be below 1"),
        (["--sam-start", "1"], "--sam-start must be a share of the steps in [0, 1)"),
        (["--target", "101"], "--target is a test accuracy in percent, 0 to 100"),
    ):
        assert main(["train", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    assert train(fake_fmnist, run) == 2
    assert "--force" in capsys.readouterr().err


def test_widths_sets_each_stage_and_rides_in_the_checkpoint(fake_fmnist, tmp_path, capsys):
    run = tmp_path / "run"
    # resnet20 has three stages; --width 0.5 multiplies the given widths into 4, 6 and 12
    assert train(fake_fmnist, run, "--widths", "8,12,24", "--width", "0.5", "--epochs", "1") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model_kwargs"]["widths"] == [8, 12, 24]
    model = model_from_checkpoint(load_checkpoint(run / "last.pt"))
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels] == [4, 6]
    assert model.fc.in_features == 12
    capsys.readouterr()
    assert train(fake_fmnist, tmp_path / "bad", "--widths", "8,16") == 2
    err = capsys.readouterr().err
    assert "--widths gives 2 stage widths (8,16) but resnet20 has 3 stages; give 3" in err
    for widths in ("8,0,16", "8,x,16"):  # refused by argparse, before anything runs
        with pytest.raises(SystemExit) as stop:
            train(fake_fmnist, tmp_path / "bad", "--widths", widths)
        assert stop.value.code == 2
        assert f"'{widths}' is not a list of stage widths" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_shortcut_se_and_zero_init_flags_reach_the_model(fake_fmnist, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(fake_fmnist, run, "--shortcut", "D", "--zero-init-residual", "--epochs", "1") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model_kwargs"]["shortcut"] == "D"
    assert config["model_kwargs"]["zero_init_residual"] is True
    model = model_from_checkpoint(load_checkpoint(run / "last.pt"))
    assert isinstance(model.layer2[0].downsample[0], torch.nn.AvgPool2d)
    assert model.layer1[0].se is None
    capsys.readouterr()
    gated = tmp_path / "se"
    assert train(fake_fmnist, gated, "--se", "2", "--epochs", "1") == 0
    assert json.loads((gated / "config.json").read_text())["model_kwargs"]["se"] == 2
    model = model_from_checkpoint(load_checkpoint(gated / "last.pt"))
    assert model.layer3[0].se.fc1.out_channels == model.layer3[0].conv2.out_channels // 2
    capsys.readouterr()
    assert train(fake_fmnist, tmp_path / "bad", "--se", "-1") == 2
    assert "--se" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        train(fake_fmnist, tmp_path / "bad", "--shortcut", "E")
    assert stop.value.code == 2
    assert "--shortcut: invalid choice: 'E'" in capsys.readouterr().err
    bad = tmp_path / "plain"
    assert train(fake_fmnist, bad, "--model", "plain_resnet20", "--zero-init-residual") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plain_resnet20 has none" in err
    assert not bad.exists()


def test_sam_flags_reach_the_config(fake_fmnist, tmp_path):
    run = tmp_path / "run"
    assert train(fake_fmnist, run, "--sam", "0.05", "--sam-start", "0.5", "--epochs", "1") == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["sam"], config["sam_start"]) == (0.05, 0.5)
    assert load_checkpoint(run / "last.pt")["config"]["sam"] == 0.05


def test_image_folder_training(tmp_path, capsys):
    for split, n in (("train", 8), ("val", 2)):
        for c, name in enumerate(("light", "dark")):
            (tmp_path / "set" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (250 - 240 * c,) * 3).save(
                    tmp_path / "set" / split / name / f"{i}.png"
                )
    run = tmp_path / "run"
    args = ["train", *TINY, "--data", str(tmp_path / "set"), "--out", str(run), "--workers", "0"]
    assert main([*args, "--max-minutes", "5"]) == 0  # the budget's probe on a folder too
    out = capsys.readouterr().out
    assert "data: image folder" in out and "16 train and 4 validation images" in out
    assert "time budget 5 min: one epoch takes about" in out and "so 2 of 2 epochs" in out
    payload = load_checkpoint(run / "best.pt")
    assert payload["classes"] == ["dark", "light"] and payload["input"]["channels"] == 3
    assert torch.is_tensor(payload["rng"]["torch"])
    assert (run / "confusion.png").is_file()
    assert main(["eval", str(run), "--data", str(tmp_path / "set")]) == 0
    assert "(4 images)" in capsys.readouterr().out
    # a held-out folder named test/ is evaluated as val/ is; train/ alone is not taken for it
    (tmp_path / "set" / "val").rename(tmp_path / "set" / "test")
    assert main(["eval", str(run), "--data", str(tmp_path / "set")]) == 0
    assert "set/test (4 images)" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "set" / "test")
    assert main(["eval", str(run), "--data", str(tmp_path / "set")]) == 2
    assert "has train/ but no held-out folder" in capsys.readouterr().err


def test_typed_epochs_drop_the_presets_time_budget():
    def config(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))[0]

    assert config().max_minutes == PRESETS["default"]["max_minutes"] > 0
    assert config("--preset", "best").max_minutes == PRESETS["best"]["max_minutes"] > 0
    assert (config("--epochs", "30").epochs, config("--epochs", "30").max_minutes) == (30, 0)
    both = config("--preset", "best", "--epochs", "60", "--max-minutes", "20")
    assert (both.epochs, both.max_minutes) == (60, 20)


def test_benchmark_overrides_become_the_train_flags_config():
    words = ["epochs=44", "stem=cifar", "widths=64,192,384,768", "augment=false", "ema=0.999"]
    overrides = parse_overrides(words)
    assert overrides == {
        "epochs": 44,
        "stem": "cifar",
        "widths": "64,192,384,768",
        "augment": False,
        "ema": 0.999,
    }
    assert "--no-augment" in train_flags(overrides)
    argv = ["train", "--preset", "best", *train_flags(overrides)]
    config = config_from_args(build_parser().parse_args(argv))[0]
    assert (config.epochs, config.augment, config.ema) == (44, False, 0.999)
    assert config.model_kwargs["widths"] == [64, 192, 384, 768]
    with pytest.raises(ReslabError, match="KEY=VALUE"):
        parse_overrides(["epochs"])


def test_target_marks_the_first_epoch_that_reached_it(fake_fmnist, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(fake_fmnist, run, "--target", "0.01") == 0
    out = capsys.readouterr().out
    first, second = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert first["target_reached"] is True and "target_reached" not in second
    assert f"reached the 0.01% target: epoch 1, step {first['step']}, after" in out
    assert f"target 0.01%: reached at epoch 1, step {first['step']}" in out


def test_target_reached_is_the_first_record_at_or_above_it():
    history = [{"test_acc": a} for a in (0.5, 0.7, 0.9, 0.6)]
    assert target_reached(70, history) is history[1]
    assert target_reached(95, history) is None and target_reached(0, history) is None
