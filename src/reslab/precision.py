"""Which precision training, evaluation, prediction and the benchmarks compute in.

``--precision`` takes ``fp32``, ``bf16`` (bfloat16 autocast) or ``auto``, and
:func:`resolve_precision` is the one rule that turns ``auto`` into one of the other two:

- on a GPU, fp32: a GPU run keeps the CPU runs' fp32 numerics (no TF32, no bf16);
- on a CPU without native bf16 (AVX512-BF16 or AMX), fp32, untimed: there oneDNN emulates
  bf16 and runs several times slower than fp32;
- on a CPU with native bf16, both are timed on the work at hand (``measure``: an epoch for
  training, :func:`time_forward` of a batch for evaluation, prediction and ``reslab bench``),
  ``TIMING_ROUNDS`` times each, alternately, and the medians compared: with native bf16
  alike, the same model trained at 0.92x fp32's rate on one CPU and 1.75x on another
  (benchmarks/results/train_step-20261126-010948.json, train_step-20261128-035524.json).
  bf16 at least ``BF16_MIN_SPEEDUP`` times faster is bf16; at most ``FP32_MIN_SPEEDUP``
  times as fast (fp32 clearly faster) is fp32; between the two the timing cannot tell them
  apart under a moment's load, and the CPU's features decide: bf16 with AMX-BF16 (tile units
  that multiply bf16 matrices in hardware), fp32 with AVX512-BF16 alone. The band keeps
  identical commands on one machine from training in different precisions.

The choice is reported in one line, so a run's log says what it computed in and why.
"""

from __future__ import annotations

import functools
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reslab.errors import ReslabError

log = logging.getLogger("reslab")

PRECISIONS = ("auto", "fp32", "bf16")
# bf16 rounds every product to 8 significant bits: timing alone chooses it only for a clear
# gain, and fp32 only for a clear loss; the band between is wide enough that a momentary load
# on a shared machine (one timing several times too slow) moves a median-of-rounds ratio
# within it rather than across it
BF16_MIN_SPEEDUP = 1.5
FP32_MIN_SPEEDUP = 0.87
TIMING_ROUNDS = 3


@functools.cache
def cpuinfo_fields(text: str | None = None) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (``text``, else the file);
    empty where Linux gives none."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    return frozenset(cpuinfo_fields().get("flags", "").split())


def bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); where
    /proc/cpuinfo is absent, oneDNN is asked."""
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def format_seconds(seconds: float) -> str:
    """``2m 05s``, ``12.5s`` or, under a second, ``35.2ms``."""
    if seconds < 1:
        return f"{1e3 * seconds:.1f}ms"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m {sec:02d}s" if minutes else f"{seconds:.1f}s"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def resolve_precision(
    requested: str,
    device: str = "cpu",
    measure: Callable[[str], float] | None = None,
    say: Callable[[str], None] = _to_stderr,
    what: str = "a forward pass",
) -> tuple[str, float | None]:
    """(``"fp32"`` or ``"bf16"``, the chosen precision's measured seconds or None).

    ``requested`` is ``auto``, ``fp32`` or ``bf16``; ``auto`` follows the module's rule,
    calling ``measure(precision) -> seconds`` for each precision ``TIMING_ROUNDS`` times,
    alternately, only on a CPU with native bf16, and says its choice through ``say`` in one line (``what`` names what
    ``measure`` times). An explicit bf16 on a CPU without native bf16 is honoured, with a
    warning that it will be slow.
    """
    if requested not in PRECISIONS:
        raise ReslabError(f"unknown precision {requested!r}; expected one of {PRECISIONS}")
    on_cpu = torch.device(device).type == "cpu"
    if requested != "auto":
        if requested == "bf16" and on_cpu and not bf16_supported():
            log.warning("reslab: bf16 requested on a CPU without native bf16; it will be slow")
        return requested, None
    if not on_cpu or not bf16_supported():
        why = (
            "a GPU run keeps the CPU runs' fp32 numerics"
            if not on_cpu
            else "this CPU has no native bf16 (AVX512-BF16 or AMX)"
        )
        say(f"precision auto: fp32, {why}")
        return "fp32", None
    if measure is None:
        say("precision auto: fp32, nothing was given to time bf16 against it")
        return "fp32", None
    seconds = alternate_medians(measure)
    speedup = seconds["fp32"] / seconds["bf16"]
    chosen, why = _decide(speedup)
    say(
        f"precision auto: {chosen}; {what} takes about {format_seconds(seconds['fp32'])} in "
        f"fp32 and {format_seconds(seconds['bf16'])} in bf16 here (median of "
        f"{TIMING_ROUNDS} alternate timings, bf16 {speedup:.2f}x): {why}"
    )
    return chosen, seconds[chosen]


def alternate_medians(measure: Callable[[str], float]) -> dict[str, float]:
    """Median seconds of each precision over ``TIMING_ROUNDS`` rounds, timed alternately in
    the order fp32, bf16, bf16, fp32, ... so that a drift in load weighs on both alike."""
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for round_ in range(TIMING_ROUNDS):
        order = ("fp32", "bf16") if round_ % 2 == 0 else ("bf16", "fp32")
        for precision in order:
            times[precision].append(measure(precision))
    return {precision: statistics.median(values) for precision, values in times.items()}


def _decide(speedup: float) -> tuple[str, str]:
    """The precision for a measured bf16 ``speedup`` over fp32, and why, in a few words."""
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"at least {BF16_MIN_SPEEDUP:g}x faster"
    if speedup <= FP32_MIN_SPEEDUP:
        return "fp32", f"fp32 is clearly faster (bf16 at most {FP32_MIN_SPEEDUP:g}x)"
    band = f"between {FP32_MIN_SPEEDUP:g}x and {BF16_MIN_SPEEDUP:g}x timing cannot tell"
    if "amx_bf16" in cpu_flags():
        return "bf16", f"{band}, and this CPU multiplies bf16 in AMX tiles"
    return "fp32", f"{band}, and this CPU has no AMX-BF16"


def time_forward(call: Callable[[torch.Tensor], object], example: torch.Tensor, runs: int = 3):
    """Median seconds of ``call(example)`` over ``runs`` calls in inference mode, after one
    untimed call (oneDNN builds its kernels on the first)."""
    with torch.inference_mode():
        call(example)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call(example)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
