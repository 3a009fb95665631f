"""benchmarks/seed_screen.py on the synthetic Fashion-MNIST: copies train, and are scored apart."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "seed_screen.py"
spec = importlib.util.spec_from_file_location("seed_screen", SCRIPT)
seed_screen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_screen)


def run(fake_fmnist, out, *sets, copies="3"):
    argv = ["--copies", copies, "--device", "cpu", "--precision", "fp32", "--out", str(out)]
    tiny = ["epochs=4", "batch_size=8", "width=0.125", "ema=0", "verify=false", "tta_shift=1"]
    return seed_screen.main([*argv, "--set", f"data_dir={fake_fmnist}", *tiny, *sets])


def test_copies_train_and_each_is_scored(fake_fmnist, tmp_path, capsys):
    out = tmp_path / "screen.json"
    assert run(fake_fmnist, out) == 0
    record = json.loads(out.read_text())
    assert record["copies"] == 3 and record["seeds"] == [0, 1, 2]
    assert record["config"]["epochs"] == 4 and record["config"]["model"] == "resnet18"
    assert record["config"]["model_kwargs"]["width"] == 0.125  # the preset's, then the --set
    losses = [epoch["train_loss"] for epoch in record["history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]  # the synthetic squares are learnt
    last = record["history"][-1]
    # every copy scored on its own, with the mirror and with the 10 views (20 test images)
    assert len(last["mirror"]) == len(last["views"]) == 3
    assert all(v * 20 == round(v * 20) for v in last["views"])
    assert record["test_accuracy"] == last["views"]
    assert record["mean"] == pytest.approx(statistics.fmean(last["views"]))
    assert "3 seeds: mean" in capsys.readouterr().out


def test_unsupported_settings_are_refused(fake_fmnist, tmp_path, capsys):
    assert run(fake_fmnist, tmp_path / "x.json", "cutmix=0.5") == 2
    assert "does not support cutmix" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert run(fake_fmnist, tmp_path / "x.json", "shortcut=A") == 2
    assert "option A" in capsys.readouterr().err
    assert run(fake_fmnist, tmp_path / "x.json", "colour=red") == 2
    assert "no config field named colour" in capsys.readouterr().err
