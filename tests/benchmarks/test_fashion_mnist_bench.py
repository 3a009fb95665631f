"""benchmarks/fashion_mnist.py --seeds: the mean, spread and time to 94% over a preset's seeds."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "fashion_mnist.py"
spec = importlib.util.spec_from_file_location("fashion_mnist_bench", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def row(preset, seed, accuracy, seconds, to94, stopped=False):
    record = {"preset": preset, "config": {"seed": seed}, "test_accuracy": accuracy}
    record.update(seconds=seconds, seconds_to_94=to94)
    if stopped:
        record["stopped"] = "exit status 1 after 2 epochs"
    return record


def test_the_summary_is_over_each_presets_finished_seeds():
    rows = [
        row("speedrun", 0, 0.940, 290.0, 250.0),
        row("speedrun", 1, 0.936, 300.0, None),
        row("speedrun", 2, 0.944, 280.0, 230.0),
        row("speedrun", 3, 0.10, 20.0, None, stopped=True),
        row("default", 0, 0.935, 560.0, None),
    ]
    summary = bench.seed_summary(rows)
    assert list(summary) == ["speedrun"]  # one finished default run has no spread
    seeds = summary["speedrun"]
    assert seeds["seeds"] == [0, 1, 2]
    assert seeds["mean_accuracy"] == pytest.approx(0.940)
    assert seeds["std_accuracy"] == pytest.approx(0.004)
    assert (seeds["min_accuracy"], seeds["max_accuracy"]) == (0.936, 0.944)
    assert (seeds["max_seconds"], seeds["reached_94"]) == (300.0, 2)
    assert seeds["mean_seconds_to_94"] == pytest.approx(240.0)
