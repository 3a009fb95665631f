"""Crash safety, interruption and multi-process training, run as real subprocesses."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from reslab.engine.checkpoint import load_checkpoint

# Runs `reslab train` on the synthetic set with the system Fashion-MNIST folder hidden, after
# installing a hook that can kill the process at a chosen step: the crash happens in the
# middle of a real run, not in a mock.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import torch
    from reslab.data import fashion_mnist
    from reslab.engine import train

    fashion_mnist.SYSTEM_DIR = Path("/nonexistent")
    kill_at, how, dump = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)

    class Crash(train.Hooks):
        def after_step(self, state, loss):
            if state.step == kill_at:
                os.kill(os.getpid(), getattr(signal, how))
            if dump != "-" and state.step == state.config.epochs * 5:
                rank = state.world.rank
                torch.save(state.model.state_dict(), Path(dump) / f"rank{rank}.pt")

    original_fit = train.fit
    train.fit = lambda config, **kw: original_fit(config, hooks=Crash(), **kw)
    from reslab.cli import main

    # main() reads sys.argv, as `reslab` does, so that `--processes N` starts N copies of this
    # very script (hooks included) as its ranks
    sys.argv[1:] = sys.argv[4:]
    sys.exit(main())
    """
)


def train_args(data_dir, out, *extra):
    return [
        "train",
        "--model=resnet20",
        "--width=0.25",
        f"--data-dir={data_dir}",
        "--no-verify",
        "--image-size=16",
        "--epochs=2",
        "--batch-size=8",
        "--lr=0.05",
        "--precision=fp32",
        "--threads=1",
        "--processes=1",
        f"--out={out}",
        *extra,
    ]


def run_script(tmp_path, kill_at, how, args, dump="-", launcher=()):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [*launcher, str(script), str(kill_at), how, str(dump), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def reference(fake_fmnist, tmp_path):
    """Final checkpoint of the uninterrupted run (2 epochs of 5 steps)."""
    result = run_script(
        tmp_path,
        -1,
        "SIGKILL",
        train_args(fake_fmnist, tmp_path / "whole"),
        launcher=[sys.executable],
    )
    assert result.returncode == 0, result.stderr
    return load_checkpoint(tmp_path / "whole" / "last.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(fake_fmnist, tmp_path, reference):
    # killed at a step after the first, the checkpoint every step leaves (step kill_at - 1) is
    # inside one of the two epochs of 5 steps, never at an epoch's end: the resume must skip
    # the epoch's batches already taken. Seeded, so that a failure can be replayed.
    kill_at = random.Random(20250611).choice([k for k in range(2, 10) if (k - 1) % 5])
    out = tmp_path / "killed"
    killed = run_script(
        tmp_path,
        kill_at,
        "SIGKILL",
        train_args(fake_fmnist, out, "--save-every=1"),
        launcher=[sys.executable],
    )
    assert killed.returncode == -9
    saved = load_checkpoint(out / "last.pt")  # the last good one, intact
    assert saved["step"] == kill_at - 1
    assert saved["progress"]["batches"] == (kill_at - 1) % 5  # mid-epoch
    assert not list(out.glob(".*.tmp"))
    from reslab.cli import main

    assert main(["train", f"--resume={out}"]) == 0
    final = load_checkpoint(out / "last.pt")
    assert final["step"] == reference["step"] == 10
    assert_same_weights(final["state_dict"], reference["state_dict"])


@pytest.mark.parametrize("how, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(
    fake_fmnist, tmp_path, reference, how, code
):
    out = tmp_path / how
    stopped = run_script(tmp_path, 3, how, train_args(fake_fmnist, out), launcher=[sys.executable])
    assert stopped.returncode == code, stopped.stderr
    assert f"reslab train --resume {out}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    saved = load_checkpoint(out / "last.pt")
    assert saved["step"] == 4 and saved["progress"]["batches"] == 4  # mid-epoch 1
    from reslab.cli import main

    assert main(["train", f"--resume={out}"]) == 0
    assert_same_weights(load_checkpoint(out / "last.pt")["state_dict"], reference["state_dict"])


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize(
    "launcher, flags, extra",
    [
        (TORCHRUN, [], []),
        ([sys.executable], ["--processes=2"], []),
        # SAM's ascent follows the gradient averaged over the processes, so it moves as one
        # process's does; its second half of the run takes the second pass
        ([sys.executable], ["--processes=2"], ["--sam=0.05", "--sam-start=0.5"]),
    ],
    ids=["torchrun", "processes", "processes-sam"],
)
def test_two_processes_match_one_with_the_same_global_batch(
    fake_fmnist, tmp_path, launcher, flags, extra
):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    args = ["--sync-bn", "--no-augment", *extra]
    single = run_script(
        tmp_path, -1, "SIGKILL", train_args(fake_fmnist, one / "run", *args), one, [sys.executable]
    )
    assert single.returncode == 0, single.stderr
    double = run_script(
        tmp_path, -1, "SIGKILL", train_args(fake_fmnist, two / "run", *args, *flags), two, launcher
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "processes: 2; global batch 8 (4 per process)" in double.stdout
    assert double.stdout.count("test accuracy") == 1  # rank 1 is silent
    rank0 = torch.load(two / "rank0.pt", weights_only=True)
    rank1 = torch.load(two / "rank1.pt", weights_only=True)
    assert_same_weights(rank0, rank1)
    reference = torch.load(one / "rank0.pt", weights_only=True)
    for key, value in reference.items():
        if value.is_floating_point():
            assert torch.allclose(rank0[key], value, atol=1e-4, rtol=1e-3), key
    assert (two / "run" / "last.pt").is_file() and (two / "run" / "metrics.jsonl").is_file()


def test_two_processes_keep_one_time_budget(fake_fmnist, tmp_path):
    # --max-minutes times an epoch before the run and plans again after each of the first
    # epochs; both are collectives, so the ranks plan the same (a rank left out would hang it)
    out = tmp_path / "run"
    args = train_args(
        fake_fmnist, out, "--processes=2", "--sync-bn", "--epochs=3", "--max-minutes=5"
    )
    result = run_script(tmp_path, -1, "SIGKILL", args, tmp_path, [sys.executable])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "so 3 of 3 epochs" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert_same_weights(
        torch.load(tmp_path / "rank0.pt", weights_only=True),
        torch.load(tmp_path / "rank1.pt", weights_only=True),
    )


def test_sigterm_to_the_launcher_stops_every_rank_at_one_saved_step(fake_fmnist, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    args = train_args(fake_fmnist, out, "--processes=2", "--epochs=10000")
    launcher = subprocess.Popen(
        [sys.executable, str(script), "-1", "SIGKILL", "-", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)  # rank 0 writes it after the first epoch: both ranks are training
    launcher.send_signal(signal.SIGTERM)  # to the launcher alone; it passes the signal on
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, stderr[-3000:]
    assert stderr.count(f"reslab train --resume {out}") == 1 and "Traceback" not in stderr
    saved = load_checkpoint(out / "last.pt")
    assert 5 <= saved["step"] < 5 * 10000


def test_a_bad_value_is_reported_once_before_any_rank_starts(fake_fmnist, tmp_path, capsys):
    from reslab.cli import main

    code = main(train_args(fake_fmnist, tmp_path / "run", "--processes=2", "--batch-size=7"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--batch-size 7" in err and "2 processes" in err
    assert not (tmp_path / "run").exists()
