"""Run folders side by side: one summary per run, and the configuration keys two runs differ in.

A run folder is what `reslab train` or `reslab detect train` writes: ``config.json``, then
``metrics.jsonl`` (one record per finished epoch) or a detector's ``log.jsonl`` (one per
step). Only those files are read, never a checkpoint, so a folder of many runs lists fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from reslab.errors import ReslabError

# keys that name the run folder itself or how it was started, not the recipe
NOT_RECIPE = ("out", "force", "resume")


@dataclass
class RunSummary:
    folder: Path
    date: str  # when config.json was written, local time
    task: str  # classification or detection
    model: str
    preset: str
    epochs: int  # finished (a detector's: that took steps)
    planned: int | None
    accuracy: float | None  # the last epoch's test accuracy (classification)
    seconds: float | None  # wall time to the last finished epoch
    precision: str


def read_config(folder: Path) -> dict:
    """A run folder's ``config.json``, or a one-line error that says what the folder lacks."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ReslabError(f"run folder {folder} does not exist")
    if not path.is_file():
        raise ReslabError(
            f"{folder} is not a run folder: it has no config.json (written by reslab train "
            "and reslab detect train)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReslabError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ReslabError(f"{path} does not hold a configuration (a JSON object)")
    return config


def _records(path: Path) -> list[dict]:
    """The JSON lines of ``path`` that parse; a line cut by a crash is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def summarize(folder: Path) -> RunSummary:
    """One run's summary; a folder with a configuration but no metrics is an error."""
    config = read_config(folder)
    written = datetime.fromtimestamp((folder / "config.json").stat().st_mtime)
    date = written.strftime("%Y-%m-%d %H:%M")
    if "train" in config and "detector" in config:  # reslab detect train's config.json
        return _detection_summary(folder, config, date)
    metrics = folder / "metrics.jsonl"
    records = _records(metrics) if metrics.is_file() else []
    if not records:
        raise ReslabError(
            f"{folder} has no metrics: metrics.jsonl is missing or empty, so no epoch finished "
            "(a run that stopped in its first epoch; resume it with reslab train --resume)"
        )
    last = records[-1]
    return RunSummary(
        folder,
        date,
        "classification",
        str(config.get("model", "?")),
        str(config.get("preset", "?")),
        int(last.get("epoch", len(records))),
        config.get("epochs"),
        last.get("test_acc"),
        last.get("elapsed_s"),
        str(config.get("precision", "?")),
    )


def _detection_summary(folder: Path, config: dict, date: str) -> RunSummary:
    log = folder / "log.jsonl"
    records = _records(log) if log.is_file() else []
    if not records:
        raise ReslabError(f"{folder} has no metrics: log.jsonl is missing or empty")
    train = config["train"]
    backbone = config["detector"].get("backbone", "resnet") if config["detector"] else "?"
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), int)]
    return RunSummary(
        folder,
        date,
        "detection",
        f"faster r-cnn c4 ({backbone})",
        "detect",
        max(epochs, default=-1) + 1,  # the epochs that took steps
        train.get("epochs"),
        None,
        None,
        str(train.get("precision", "?")),
    )


def find_runs(root: Path) -> tuple[list[RunSummary], list[str]]:
    """The runs in ``root`` (itself, when it is a run folder; else its subfolders, newest
    first), and a note for each subfolder that is a run without metrics."""
    if (root / "config.json").is_file():
        return [summarize(root)], []
    if not root.is_dir():
        raise ReslabError(f"{root} does not exist; give the folder that holds the run folders")
    runs, notes = [], []
    for folder in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        try:
            runs.append(summarize(folder))
        except ReslabError as error:
            notes.append(f"skipped: {error}")
    if not runs and not notes:
        raise ReslabError(f"{root} holds no run folders (folders with a config.json)")
    runs.sort(key=lambda run: (run.date, run.folder.name), reverse=True)
    return runs, notes


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested configuration keys as dotted names: ``model_kwargs.width``."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_diff(a: Path, b: Path) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every configuration key whose values differ, a key
    that one run lacks shown as None; the keys that name the folder (``out``) left out."""
    first, second = flatten(read_config(a)), flatten(read_config(b))
    missing = object()
    rows = []
    for key in sorted(first.keys() | second.keys()):
        if key.split(".")[-1] in NOT_RECIPE:
            continue
        left, right = first.get(key, missing), second.get(key, missing)
        if left != right:
            rows.append(
                (key, None if left is missing else left, None if right is missing else right)
            )
    return rows
