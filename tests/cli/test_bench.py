"""`reslab bench` end to end on a tiny input, one round (reslab/cli/bench.py, reslab/bench.py)."""

import json

import pytest
import torch

from reslab.bench import model_kwargs_for, torchvision_twin
from reslab.cli import main
from reslab.errors import ReslabError
from reslab.models import create_model


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bench_writes_json(tmp_path, capsys, monkeypatch, native_bf16):
    # "auto" is fp32 where bf16 is not native or not timed faster (here: timed equal); a CPU
    # with native bf16 also gets a bf16 fast-path row
    monkeypatch.setattr("reslab.precision.bf16_supported", lambda: native_bf16)
    monkeypatch.setattr("reslab.bench.bf16_supported", lambda: native_bf16)
    # no AMX, whatever this CPU has: AMX-BF16 takes bf16 on equal timings
    monkeypatch.setattr("reslab.precision.cpu_flags", lambda: frozenset())
    monkeypatch.setattr("reslab.bench.time_forward", lambda call, example, runs=3: 1.0)
    out = tmp_path / "bench.json"
    argv = ["bench", "--input", "1,8,8", "--batch-size", "2", "--rounds", "1", "--warmup", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {"torchvision", "default", "fast", "onnx"} | ({"fast_bf16"} if native_bf16 else set())
    assert set(result["variants"]) == rows
    assert result["variants"]["fast"]["precision"] == "fp32"
    if native_bf16:
        assert result["variants"]["fast_bf16"]["precision"] == "bf16"
        assert result["variants"]["fast_bf16"]["train_img_s"] > 0
        assert result["matmul_gflop_s"]["bf16"]["median"] > 0
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] == torch.__version__
    assert result["onnx_check"]["max_abs_diff"] < 1e-4
    fast = result["variants"]["fast"]
    assert fast["train_img_s"] > 0 and fast["infer_img_s"] > 0 and fast["latency_ms"] > 0
    assert result["variants"]["torchvision"]["train_ratio"] == 1.0
    assert "train_img_s" not in result["variants"]["onnx"]
    assert result["matmul_gflop_s"]["fp32"]["median"] > 0
    assert "(c) reslab fast" in capsys.readouterr().out


def test_torchvision_twin_has_the_same_architecture():
    kwargs = model_kwargs_for("resnet18", (1, 28, 28))
    assert kwargs == {"in_channels": 1, "stem": "small", "num_classes": 10}
    twin = torchvision_twin("resnet18", kwargs)
    ours = create_model("resnet18", **kwargs)
    ours.load_state_dict(twin.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), twin.eval()(x))


def test_bench_refuses_models_torchvision_lacks():
    with pytest.raises(ReslabError, match="no twin"):
        torchvision_twin("resnet20", {})


def test_fast_variant_leaves_the_default_model_nchw():
    from reslab.bench import BenchConfig, _torch_variant

    cfg = BenchConfig(input_shape=(1, 8, 8), batch_size=2)
    model = create_model("resnet18", **model_kwargs_for("resnet18", (1, 8, 8)))
    variant = _torch_variant("fast", "(c)", model, "fp32", True, cfg)
    variant.train_step()
    assert model.layer1[0].conv1.weight.is_contiguous()
    assert not model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
