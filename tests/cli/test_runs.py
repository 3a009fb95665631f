"""`reslab runs`: the table of a folder's runs, and the keys two runs differ in."""

from __future__ import annotations

import json
import os

import pytest

from reslab.cli import main
from reslab.engine.config import TrainConfig
from reslab.engine.runs import config_diff, find_runs


def write_run(folder, records, mtime: float, **config) -> None:
    folder.mkdir(parents=True)
    values = {**TrainConfig().to_dict(), "out": str(folder), **config}
    (folder / "config.json").write_text(json.dumps(values))
    os.utime(folder / "config.json", (mtime, mtime))
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def record(epoch: int, acc: float, seconds: float) -> dict:
    return {"epoch": epoch, "step": 10 * epoch, "test_acc": acc, "elapsed_s": seconds}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "old", [record(1, 0.8, 60)], 1.7e9, model="resnet20", epochs=3)
    write_run(
        root / "new",
        [record(1, 0.85, 50), record(2, 0.91, 100)],
        1.8e9,
        model="resnet18",
        precision="bf16",
        model_kwargs={"width": 0.5},
    )
    (root / "new" / "metrics.jsonl").open("a").write('{"epoch": 3, "te')  # cut by a crash
    detect = root / "detector"
    detect.mkdir()
    config = {"detector": {"backbone": "resnet50"}, "train": {"epochs": 4, "precision": "fp32"}}
    (detect / "config.json").write_text(json.dumps(config))
    (detect / "log.jsonl").write_text('{"epoch": 0, "step": 1}\n{"epoch": 1, "step": 2}\n')
    write_run(root / "crashed", [], 1.75e9)
    (root / "notes").mkdir()  # not a run
    return root


def test_the_table_has_one_row_per_run_newest_first(runs, capsys):
    found, notes = find_runs(runs)
    names = [r.folder.name for r in found]
    assert names.index("new") < names.index("old") and "notes" not in names
    new = found[names.index("new")]
    assert (new.model, new.epochs, new.planned, new.accuracy, new.seconds, new.precision) == (
        "resnet18",
        2,
        10,
        0.91,
        100,
        "bf16",
    )
    detector = found[names.index("detector")]
    assert (detector.task, detector.epochs, detector.planned, detector.accuracy) == (
        "detection",
        2,
        4,
        None,
    )
    assert notes == [f"skipped: {runs / 'crashed'} has no metrics: metrics.jsonl is missing or "
                     "empty, so no epoch finished (a run that stopped in its first epoch; resume "
                     "it with reslab train --resume)"]  # fmt: skip
    assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "91.00" in out and "1m 40s" in out and "resnet50" in out


def test_diff_shows_the_keys_that_differ(runs, capsys):
    rows = config_diff(runs / "old", runs / "new")
    assert rows == [
        ("epochs", 3, 10),
        ("model", "resnet20", "resnet18"),
        ("model_kwargs", {}, None),
        ("model_kwargs.width", None, 0.5),
        ("precision", "fp32", "bf16"),
    ]
    assert main(["runs", "--diff", str(runs / "old"), str(runs / "old")]) == 0
    assert "have the same configuration" in capsys.readouterr().out


def test_bad_folders_are_one_line_errors(runs, tmp_path, capsys):
    for argv, needle in (
        (["runs", str(runs / "crashed")], "has no metrics"),
        (["runs", str(tmp_path / "none")], "does not exist"),
        (["runs", str(runs / "notes")], "holds no run folders"),
        (["runs", "--diff", str(runs / "old"), str(runs / "notes")], "has no config.json"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("reslab: error: ") and err.count("\n") == 1 and needle in err, err
