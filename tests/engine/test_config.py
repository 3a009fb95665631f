import math

import pytest

from reslab.engine.config import PRESETS, TrainConfig, build_config, config_from_flags
from reslab.errors import ReslabError


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"epochs": -1}, "--epochs must be a whole number >= 1"),
        ({"batch_size": 0}, "--batch-size must be a whole number >= 1"),
        ({"lr": math.nan}, "--lr must be a finite number"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"label_smoothing": 1.5}, "--label-smoothing must be below 1"),
        ({"model": "resnet19"}, "unknown model 'resnet19'"),
        ({"optimizer": "lion"}, "--optimizer must be one of"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"cutmix": 1.5}, "--cutmix must be between 0 and 1"),
        ({"sam": -0.05}, "--sam must be >= 0"),
        ({"sam_start": 1.0}, r"--sam-start must be a share of the steps in \[0, 1\), got 1.0"),
        ({"sam_start": math.nan}, "--sam-start must be a share"),
        ({"device": "gpu"}, "--device must be cpu, cuda or cuda:N, got 'gpu'"),
        ({"device": "cuda:x"}, "--device must be cpu, cuda or cuda:N"),
        ({"schedule_anchor": [10, 1.5]}, r"schedule_anchor is \[\] or \[step, share"),
        ({"schedule_anchor": [10]}, r"schedule_anchor is \[\] or"),
        ({"schedule_anchor": [10, "x"]}, "--schedule-anchor must be list"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ReslabError, match=message) as info:
        build_config("default", **override)
    assert "\n" not in str(info.value)


def test_presets_build_and_round_trip():
    for name in PRESETS:
        config = build_config(name)
        assert config.preset == name
        assert TrainConfig.from_dict(config.to_dict()) == config
    seed = build_config("seed")
    assert (seed.optimizer, seed.lr, seed.batch_size, seed.epochs, seed.image_size) == (
        "adam",
        1e-3,
        256,
        5,
        96,
    )
    assert seed.model_kwargs == {"stem": "imagenet"} and not seed.augment
    # the wall-time limits, with room for the process start and the final plots
    assert 0 < build_config("default").max_minutes < 10
    assert 0 < build_config("best").max_minutes < 60
    speedrun = build_config("speedrun")
    assert 0 < speedrun.max_minutes < 5 and speedrun.target == 94.0 and speedrun.tta_shift == 1
    assert seed.max_minutes == 0  # the reference recipe runs all its epochs
    # the tuned presets time bf16 against fp32 where bf16 is native; the reference stays fp32
    assert seed.precision == "fp32"
    assert build_config("default").precision == build_config("best").precision == "auto"


def test_unknown_preset_and_key():
    with pytest.raises(ReslabError, match="unknown preset"):
        build_config("fastest")
    with pytest.raises(ReslabError, match="unknown config key"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_cuda_device_needs_a_gpu_and_one_process(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ReslabError, match="--device cuda: this PyTorch sees no CUDA GPU"):
        build_config("default", device="cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ReslabError, match=r"--device cuda:1: only 1 GPU\(s\) are visible"):
        build_config("default", device="cuda:1")
    with pytest.raises(ReslabError, match="--device cuda trains in one process"):
        build_config("default", device="cuda", processes=2)
    assert build_config("default", device="cuda:0").device == "cuda:0"


def test_config_from_flags_applies_the_rules():
    config, payload, run_dir = config_from_flags("best", {"epochs": 30, "stem": "small"})
    assert (payload, run_dir) == (None, None)
    # a typed epoch count drops the preset's budget; model flags go to model_kwargs
    assert (config.epochs, config.max_minutes) == (30, 0.0)
    assert config.model_kwargs == {"stem": "small", "width": 0.25}
    assert "stem" not in config.to_dict()
    budgeted = config_from_flags("best", {"epochs": 60, "max_minutes": 20.0})[0]
    assert (budgeted.epochs, budgeted.max_minutes) == (60, 20.0)
    assert config_from_flags("default", {})[0] == build_config("default")
    # widths as a benchmark's --set gives them: one string
    widths = config_from_flags("best", {"widths": "64,192,384,768"})[0]
    assert widths.model_kwargs["widths"] == [64, 192, 384, 768]
    with pytest.raises(ReslabError, match="'64,x' is not a list of stage widths"):
        config_from_flags("best", {"widths": "64,x"})


def test_resume_may_change_only_epochs_and_device():
    with pytest.raises(ReslabError, match=r"only --epochs and --device may change \(got --lr\)"):
        config_from_flags("default", {"resume": "run", "epochs": 3, "lr": 1.0})


def test_the_speedrun_preset_builds_the_network_it_names():
    from torch import nn

    from reslab.models import create_model

    config = build_config("speedrun")
    model = create_model(config.model, in_channels=1, num_classes=10, **config.model_kwargs)
    # the quarter-width ResNet-18 with the small stem: 16 channels at 14x14 after the pool
    assert model.conv1.out_channels == 16 and isinstance(model.maxpool, nn.MaxPool2d)
    assert [stage[0].conv1.out_channels for stage in model.stages] == [16, 32, 64, 128]
    assert sum(p.numel() for p in model.parameters()) == 701_178
    assert (config.batch_size, config.lr) == (128, 0.1)
