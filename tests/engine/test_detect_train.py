"""`detect train` and `detect eval|predict` resolving --precision auto, and the ranks told it."""

from __future__ import annotations

import pytest
import torch

from reslab import precision as precision_module
from reslab.engine import detect_infer, detect_train, distributed
from reslab.engine.detect_config import DetectConfig, InferConfig
from reslab.engine.distributed import World
from reslab.models.detection import DetectorConfig, RoIHeadsConfig, RPNConfig, build_detector


def native_bf16(monkeypatch, present: bool) -> None:
    flags = {"avx2", "avx512_bf16"} if present else {"avx2", "fma"}
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(flags))


def bars_config(root) -> DetectConfig:
    return DetectConfig.from_dict(
        {
            "data": {"images": str(root), "annotations": str(root / "ann.json")},
            "model": {
                "backbone": "resnet18",
                "width": 0.25,
                "rpn": {"anchor_sizes": [8, 16, 32], "post_nms_top_n_train": 50},
                "roi_heads": {"batch_size_per_image": 8},
            },
            "train": {"batch_size": 2},
        }
    )


def test_a_timed_training_step_leaves_the_random_state(tmp_path, write_bars):
    write_bars(tmp_path, 4)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    seconds = detect_train.step_seconds(bars_config(tmp_path), "fp32", World())
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("fp32, bf16, chosen", [(2.0, 1.0, "bf16"), (1.0, 1.0, "fp32")])
def test_auto_training_precision_times_a_step_in_each(
    tmp_path, write_bars, monkeypatch, fp32, bf16, chosen
):
    native_bf16(monkeypatch, True)
    timed = []

    def seconds(config, precision, world):
        timed.append(precision)
        return {"fp32": fp32, "bf16": bf16}[precision]

    monkeypatch.setattr(detect_train, "step_seconds", seconds)
    lines = []
    console = type("Say", (), {"print": staticmethod(lines.append)})
    got = detect_train.resolve_train_precision(bars_config(tmp_path), console, World())
    assert got == chosen and timed == ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]
    assert lines[0].startswith(f"precision auto: {chosen}; a training step takes about")


def test_auto_training_precision_without_native_bf16_is_fp32_untimed(tmp_path, monkeypatch):
    native_bf16(monkeypatch, False)
    monkeypatch.setattr(detect_train, "step_seconds", lambda *a: pytest.fail("timed"))
    lines = []
    console = type("Say", (), {"print": staticmethod(lines.append)})
    assert detect_train.resolve_train_precision(DetectConfig(), console, World()) == "fp32"
    assert lines == ["precision auto: fp32, this CPU has no native bf16 (AVX512-BF16 or AMX)"]


def test_ranks_are_told_the_resolved_precision_instead_of_bf16(monkeypatch):
    started = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(
        distributed, "launch_local", lambda n, command, threads: started.append(command) or 0
    )
    argv = ["detect", "train", "--bf16", "--processes", "2"]
    assert detect_train.relaunch_as(2, argv, 1, "bf16") == 0
    assert started == [
        ["-m", "reslab", "detect", "train", "--processes", "2", "--precision", "bf16"]
    ]
    assert detect_train.relaunch_as(1, argv, 1, "bf16") is None  # one process: run here


def tiny_detector():
    torch.manual_seed(0)
    config = DetectorConfig(
        backbone="resnet18",
        width=0.25,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn=RPNConfig(pre_nms_top_n_test=50, post_nms_top_n_test=20),
        roi_heads=RoIHeadsConfig(batch_size_per_image=8),
    )
    return build_detector(config).eval()


def autocast_timed(monkeypatch, fp32: float, bf16: float) -> list[str]:
    """time_forward replaced: the seconds of the precision whose autocast is on, no run."""
    seen = []

    def fake(call, example, runs=3):
        precision = "bf16" if torch.is_autocast_enabled("cpu") else "fp32"
        seen.append(precision)
        return {"fp32": fp32, "bf16": bf16}[precision]

    monkeypatch.setattr(detect_infer, "time_forward", fake)
    return seen


def test_auto_inference_precision_times_one_image_in_each(monkeypatch):
    native_bf16(monkeypatch, True)
    seen = autocast_timed(monkeypatch, fp32=3.0, bf16=1.0)
    lines = []
    image = lambda: torch.rand(3, 64, 64)  # noqa: E731
    got = detect_infer.inference_precision(InferConfig(), tiny_detector(), image, lines.append)
    assert got == "bf16" and seen == ["fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]
    assert "one image through the detector takes about" in lines[0]
    # the int8 head keeps the trunk in fp32: nothing timed
    seen.clear()
    int8 = InferConfig(int8=True)
    assert detect_infer.inference_precision(int8, tiny_detector(), image, lines.append) == "fp32"
    assert seen == []


def test_an_explicit_inference_precision_is_kept_untimed(monkeypatch):
    native_bf16(monkeypatch, True)
    seen = autocast_timed(monkeypatch, fp32=3.0, bf16=1.0)
    lines = []
    for asked in ("fp32", "bf16"):
        config = InferConfig(precision=asked)
        image = lambda: torch.rand(3, 64, 64)  # noqa: E731
        assert detect_infer.inference_precision(config, None, image, lines.append) == asked
    assert seen == [] and lines == []
