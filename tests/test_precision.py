"""The one rule that resolves --precision auto (reslab/precision.py)."""

import logging
import random

import pytest
import torch

from reslab import create_model, fast, precision
from reslab.errors import ReslabError


def fake_measure(fp32: float, bf16: float):
    timed = []

    def measure(p: str) -> float:
        timed.append(p)
        return {"fp32": fp32, "bf16": bf16}[p]

    return measure, timed


def test_bf16_detection_reads_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert precision.bf16_supported()
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not precision.bf16_supported()


def native(monkeypatch, value: bool, amx: bool = False) -> None:
    flags = {"avx2", "avx512f", "avx512_bf16"} if value else {"avx2", "fma"}
    flags |= {"amx_tile", "amx_bf16"} if amx else set()
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.parametrize(
    ("fp32", "bf16", "amx", "chosen"),
    [
        (1.6, 1.0, False, "bf16"),  # clearly faster: bf16 whatever the features
        (0.8, 1.0, True, "fp32"),  # clearly slower: fp32 whatever the features
        (1.2, 1.0, False, "fp32"),  # the band: AVX512-BF16 alone keeps fp32
        (1.2, 1.0, True, "bf16"),  # the band: AMX-BF16 takes bf16
        (1.0, 1.0, True, "bf16"),
    ],
)
def test_auto_decides_by_clear_timings_and_by_features_in_between(
    monkeypatch, fp32, bf16, amx, chosen
):
    native(monkeypatch, True, amx)
    measure, timed = fake_measure(fp32, bf16)
    lines = []
    got = precision.resolve_precision("auto", "cpu", measure, lines.append, "an epoch")
    assert got == (chosen, {"fp32": fp32, "bf16": bf16}[chosen])
    assert timed == ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]  # alternate rounds
    assert len(lines) == 1 and lines[0].startswith(
        f"precision auto: {chosen}; an epoch takes about {precision.format_seconds(fp32)} in "
        f"fp32 and {bf16:.1f}s in bf16 here (median of 3 alternate timings, bf16 {fp32 / bf16:.2f}x)"
    )


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("true_speedup", [1.0, 1.15, 1.3])
def test_auto_gives_one_answer_whatever_moment_the_load_strikes(monkeypatch, amx, true_speedup):
    """Identical commands on one machine: the same true speeds, timed with a jitter of 5%
    and one timing slowed 5x by a momentary load, at each of the six positions in turn (or
    none). Every replay must choose the same precision."""
    native(monkeypatch, True, amx)
    g = random.Random(0)
    answers = set()

    def loaded(spike: int):
        calls = []

        def measure(p: str) -> float:
            calls.append(p)
            base = 1.0 if p == "fp32" else 1.0 / true_speedup
            slow = 5.0 if len(calls) - 1 == spike else 1.0
            return base * slow * g.uniform(0.95, 1.05)

        return measure

    for spike in [*range(-1, 6)] * 5:
        answers.add(precision.resolve_precision("auto", "cpu", loaded(spike), lambda _: None)[0])
    assert len(answers) == 1, answers


def test_auto_without_native_bf16_is_fp32_untimed(monkeypatch):
    native(monkeypatch, False)
    measure, timed = fake_measure(10.0, 1.0)
    lines = []
    assert precision.resolve_precision("auto", "cpu", measure, lines.append) == ("fp32", None)
    assert timed == []
    assert lines == ["precision auto: fp32, this CPU has no native bf16 (AVX512-BF16 or AMX)"]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_auto_on_a_gpu_is_fp32_untimed(monkeypatch, device):
    native(monkeypatch, True)
    measure, timed = fake_measure(10.0, 1.0)
    lines = []
    assert precision.resolve_precision("auto", device, measure, lines.append) == ("fp32", None)
    assert timed == []
    assert lines == ["precision auto: fp32, a GPU run keeps the CPU runs' fp32 numerics"]


def test_explicit_precisions_are_kept_and_bf16_without_native_warns(monkeypatch, caplog):
    native(monkeypatch, False)
    measure, timed = fake_measure(1.0, 10.0)
    with caplog.at_level(logging.WARNING, logger="reslab"):
        assert precision.resolve_precision("fp32", measure=measure) == ("fp32", None)
        assert caplog.text == ""
        assert precision.resolve_precision("bf16", measure=measure) == ("bf16", None)
    assert "bf16 requested on a CPU without native bf16" in caplog.text and timed == []
    caplog.clear()
    native(monkeypatch, True)
    with caplog.at_level(logging.WARNING, logger="reslab"):
        assert precision.resolve_precision("bf16") == ("bf16", None)
    assert caplog.text == ""
    with pytest.raises(ReslabError, match="unknown precision"):
        precision.resolve_precision("fp16")


def test_time_forward_is_the_median_of_timed_calls():
    calls = []
    seconds = precision.time_forward(calls.append, torch.zeros(1), runs=3)
    assert len(calls) == 4 and 0 <= seconds < 1  # one untimed warm-up call


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [(1.6, 1.0, "bf16"), (1.1, 1.0, "fp32")])
def test_inference_auto_times_the_prepared_model_in_each(monkeypatch, fp32, bf16, chosen):
    native(monkeypatch, True)
    timed = []

    def forward_seconds(call, example, runs=3):
        timed.append((call.precision, tuple(example.shape)))
        return {"fp32": fp32, "bf16": bf16}[call.precision]

    monkeypatch.setattr(fast, "time_forward", forward_seconds)
    model = create_model("resnet20", width=0.25, in_channels=1, num_classes=10)
    predictor = fast.prepare_for_inference(model, "auto")
    assert predictor.precision == chosen
    order = ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]
    assert timed == [(p, (32, 1, 28, 28)) for p in order]
    native(monkeypatch, False)
    assert fast.prepare_for_inference(model, "auto").precision == "fp32" and len(timed) == 6


def test_training_auto_times_an_autocast_forward_pass(monkeypatch):
    native(monkeypatch, True)
    monkeypatch.setattr(precision, "BF16_MIN_SPEEDUP", 0.0)  # any timing keeps bf16
    model = create_model("resnet20", width=0.25)
    prepared, chosen = fast.prepare_for_training(model, "auto", example=torch.randn(2, 3, 8, 8))
    assert chosen == "bf16" and prepared is model
    monkeypatch.setattr(precision, "BF16_MIN_SPEEDUP", float("inf"))  # none does
    assert fast.prepare_for_training(model, "auto")[1] == "fp32"


def test_format_seconds():
    assert precision.format_seconds(0.0352) == "35.2ms"
    assert precision.format_seconds(12.5) == "12.5s"
    assert precision.format_seconds(125) == "2m 05s"
