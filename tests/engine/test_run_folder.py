"""Hostile cases around a run folder (docs/reliability.md's table): resuming from an older
state, two runs on one folder, non-finite weights, a full disk, a signal as a run ends, and
the temporary files a killed run leaves."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from reslab.cli import main
from reslab.engine import checkpoint
from reslab.engine.checkpoint import load_checkpoint, save_checkpoint
from reslab.engine.config import TrainConfig
from reslab.engine.runfolder import hold_run_folder
from reslab.engine.state import new_run_dir
from reslab.errors import ReslabError


def train(data_dir, out, *extra):
    tiny = ["--model=resnet20", "--width=0.25", "--image-size=16", "--epochs=1"]
    tiny += ["--batch-size=8", "--no-verify", "--threads=1", "--processes=1"]
    return ["train", *tiny, f"--data-dir={data_dir}", f"--out={out}", *extra]


def fails_cleanly(capsys, argv, *needles) -> str:
    """``reslab ARGV`` exits 2 with one line ``reslab: error: ...`` holding every needle."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("reslab: error: ") and err.count("\n") == 1, err
    assert all(needle in err for needle in needles), err
    return err


def epochs_recorded(folder) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def test_resume_without_last_pt_refuses_and_an_older_state_truncates_metrics_and_temporaries(
    fake_fmnist, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.abc123.tmp").write_bytes(b"")  # what a SIGKILL mid-write leaves
    assert main(train(fake_fmnist, run, "--force", "--epochs=2")) == 0
    assert ".last.pt.abc123.tmp" in capsys.readouterr().out
    older = load_checkpoint(run / "last.pt")
    older["epoch"] = 1  # stands for a best.pt of epoch 1
    save_checkpoint(run / "best.pt", older)
    (run / "last.pt").unlink()
    fails_cleanly(capsys, ["train", f"--resume={run}", "--epochs=3"], "no last.pt", "epoch 1")
    (run / ".best.pt.xyz789.tmp").write_bytes(b"")
    assert main(["train", f"--resume={run / 'best.pt'}", "--epochs=3"]) == 0
    assert "dropped the records of epochs 2-2" in capsys.readouterr().out
    assert epochs_recorded(run) == [1, 2, 3]
    assert not list(run.glob(".*.tmp"))


def test_a_second_run_on_a_held_folder_names_the_holder(fake_fmnist, tmp_path, capsys):
    run = tmp_path / "run"
    with hold_run_folder(run):
        fails_cleanly(capsys, train(fake_fmnist, run, "--force"), "in use", f"PID {os.getpid()}")
    assert not (run / "metrics.jsonl").exists()
    # a holder that dies releases the folder: the kernel drops its lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys, time
                fd = os.open({str(run / ".lock")!r}, os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ReslabError, match="in use"), hold_run_folder(run):
        pass
    holder.kill()
    holder.wait()
    with hold_run_folder(run):
        pass
    assert new_run_dir(TrainConfig(out=str(run))) == run  # .lock alone: not "not empty"


def test_non_finite_weights_are_never_saved_nor_used(fake_fmnist, tmp_path, capsys):
    run = tmp_path / "run"
    # the case: batch-norm variances overflow before the loss does
    code = main(train(fake_fmnist, run, "--lr=1e6", "--save-every=2", "--epochs=3"))
    err = capsys.readouterr().err
    assert code == 2 and "inf or nan" in err and err.count("\n") == 1, err
    good = (run / "last.pt").read_bytes()
    payload = load_checkpoint(run / "last.pt")
    assert not checkpoint.non_finite_tensors(payload["state_dict"])
    name = next(k for k in payload["state_dict"] if k.endswith("running_var"))
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("inf"))
    with pytest.raises(ReslabError, match=rf"not saving .*the previous one stays.*{name}"):
        save_checkpoint(run / "last.pt", payload)
    assert (run / "last.pt").read_bytes() == good and not list(run.glob(".*.tmp"))
    # a file written some other way is refused by eval and predict
    torch.save(payload, tmp_path / "bad.pt")
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    fails_cleanly(capsys, ["eval", str(tmp_path / "bad.pt")], "inf or nan", name)
    fails_cleanly(capsys, ["predict", str(tmp_path / "bad.pt"), str(image)], "inf or nan")


def test_a_full_disk_is_one_line_naming_the_folder_and_the_space(
    fake_fmnist, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    fsync, writes = os.fsync, []

    def full_after_two(fd):  # epoch 1's last.pt and best.pt fit, epoch 2's last.pt does not
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            writes.append(fd)
            if len(writes) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_two)
    err = fails_cleanly(
        capsys, train(fake_fmnist, run, "--epochs=2"), "no space left", str(run), "MB needed"
    )
    assert "the previous last.pt is kept whole" in err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not list(run.glob(".*.tmp"))


# SIGTERM while the finished run draws its plots, as a launcher passes it on to its ranks
SIGTERM_AT_THE_END = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from reslab.data import fashion_mnist
    from reslab.engine import train

    fashion_mnist.SYSTEM_DIR = Path("/nonexistent")
    plot = train.plot_curves

    def plot_after_sigterm(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        plot(*args)

    train.plot_curves = plot_after_sigterm
    from reslab.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigterm_as_the_run_ends_still_writes_the_plots_and_says_so(fake_fmnist, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SIGTERM_AT_THE_END)
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(script), *train(fake_fmnist, run)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 143, done.stderr
    assert "test accuracy" in done.stdout
    assert "SIGTERM arrived as the run ended" in done.stderr and "Traceback" not in done.stderr
    assert (run / "curves.png").is_file() and (run / "confusion.png").is_file()
