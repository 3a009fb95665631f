"""Checkpoints are written whole or not at all: a temporary file beside the target, flushed to
disk, then renamed over it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from reslab.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint


class DiskFull(OSError):
    pass


def test_a_write_failing_midway_leaves_the_old_file_whole_and_no_temp_file(tmp_path):
    target = tmp_path / "last.pt"
    old = b"old checkpoint " * 1000
    atomic_write(target, lambda f: f.write(old))

    def fails_midway(f):
        f.write(b"new checkpoint " * 500)
        f.flush()
        raise DiskFull("no space left")

    with pytest.raises(DiskFull):
        atomic_write(target, fails_midway)
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def spy_on_renames(monkeypatch) -> list[tuple]:
    """os.replace and os.rename recorded as ("rename", source, target, source's bytes), and
    os.fsync as ("fsync",), in the order they happen."""
    events = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def spy(src, dst, *args, real=real, **kwargs):
            events.append(("rename", Path(src), Path(dst), Path(src).read_bytes()))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync",))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return events


def test_the_new_file_is_synced_then_renamed_over_the_target(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    events = spy_on_renames(monkeypatch)

    def writes(f):
        f.write(b"new")
        f.flush()
        assert target.read_bytes() == b"old"  # the target is not what is being written

    atomic_write(target, writes)
    assert target.read_bytes() == b"new"
    renames = [e for e in events if e[0] == "rename"]
    assert len(renames) == 1
    _, source, destination, content = renames[0]
    assert destination == target and source != target and source.parent == target.parent
    assert content == b"new"
    assert ("fsync",) in events[: events.index(renames[0])]  # on disk before it is renamed in
    assert not source.exists()


def test_save_checkpoint_goes_through_a_rename_and_a_failed_save_keeps_the_last(
    tmp_path, monkeypatch
):
    target = tmp_path / "last.pt"
    payload = {"format": "reslab-checkpoint", "step": 3, "weights": torch.arange(5.0)}
    events = spy_on_renames(monkeypatch)
    save_checkpoint(target, payload)
    [(_, source, destination, content)] = [e for e in events if e[0] == "rename"]
    assert destination == target and source != target and content == target.read_bytes()

    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises for a function
        save_checkpoint(target, {**payload, "step": 4, "hook": lambda: None})
    kept = load_checkpoint(target)
    assert kept["step"] == 3 and torch.equal(kept["weights"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
