"""ONNX, safetensors and TorchScript export, and reslab.load (reslab/export.py)."""

import json

import pytest
import torch
from safetensors import safe_open

import reslab
from reslab import create_model
from reslab.engine.checkpoint import make_payload, save_checkpoint
from reslab.errors import ReslabError
from reslab.export import export_onnx, export_torchscript, save_safetensors
from reslab.fast import fold_batchnorm

KWARGS = {"width": 0.125, "in_channels": 1, "stem": "small", "num_classes": 10}


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = create_model("resnet18", **KWARGS)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_var.uniform_(0.5, 2)
            bn.running_mean.uniform_(-1, 1)
    return m.eval()


def test_onnx_round_trip(model, tmp_path):
    import onnxruntime

    path = tmp_path / "m.onnx"
    check = export_onnx(model, path, (1, 28, 28))
    assert check["max_abs_diff"] <= 1e-4 and check["max_abs_output"] > 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 1, 28, 28)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("folded", [False, True])
def test_safetensors_round_trip(model, tmp_path, folded):
    path = tmp_path / "m.safetensors"
    save_safetensors(fold_batchnorm(model) if folded else model, path, folded=folded)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["name"] == "resnet18" and json.loads(metadata["kwargs"]) == KWARGS
    loaded = reslab.load(path)
    assert loaded.spec == model.spec and not loaded.training
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_load_reads_checkpoints(model, tmp_path):
    save_checkpoint(tmp_path / "last.pt", make_payload(model))
    loaded = reslab.load(tmp_path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_refuses_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ReslabError, match="no reslab metadata"):
        reslab.load(tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ReslabError, match="not a readable safetensors"):
        reslab.load(tmp_path / "bad.safetensors")


def test_torchscript_round_trip(model, tmp_path):
    export_torchscript(model, tmp_path / "m.pt", (1, 28, 28))
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_export_command(model, tmp_path, capsys, fmt):
    from reslab.cli import main

    save_checkpoint(tmp_path / "run" / "last.pt", make_payload(model))
    out = tmp_path / f"m.{fmt}"
    assert (
        main(["export", str(tmp_path / "run"), "--format", fmt, "--fold-bn", "--out", str(out)])
        == 0
    )
    assert out.is_file()
    if fmt == "onnx":
        assert "max abs difference" in capsys.readouterr().out
    else:
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(reslab.load(out)(x), model(x), rtol=1e-5, atol=1e-5)


def test_every_format_carries_classes_input_and_weights_source(model, tmp_path):
    """A served model must answer with its own classes, not its pretrained weights' ImageNet
    ones: the checkpoint's classes, input transform and weights' source go into each file."""
    import onnx

    from reslab.cli import main
    from reslab.export import ABOUT

    about = {
        "classes": [f"class {i}" for i in range(10)],
        "input": {"size": 32, "resize": 36, "channels": 1, "mean": [0.3], "std": [0.35]},
        "weights": {"source": "runs/fmnist/last.pt (reslab checkpoint of resnet18)"},
    }
    save_checkpoint(tmp_path / "run" / "last.pt", make_payload(model, **about))
    found = {}
    for fmt in ("onnx", "safetensors", "torchscript"):
        out = tmp_path / f"m-{fmt}.{fmt}"
        argv = ["export", str(tmp_path / "run"), "--format", fmt, "--out", str(out)]
        assert main(argv + (["--fold-bn"] if fmt == "onnx" else [])) == 0
        if fmt == "onnx":
            graph = onnx.load(str(out))
            found[fmt] = {p.key: p.value for p in graph.metadata_props}
            # traced at the checkpoint's input size, not the 28x28 of a 1-channel default
            dims = graph.graph.input[0].type.tensor_type.shape.dim
            assert [d.dim_value for d in dims[1:]] == [1, 32, 32]
        elif fmt == "safetensors":
            with safe_open(str(out), framework="pt") as f:
                found[fmt] = f.metadata()
            assert reslab.load(out).about == about  # and back again
        else:
            files = dict.fromkeys(ABOUT, "")
            torch.jit.load(str(out), _extra_files=files)
            found[fmt] = files
    for fmt, strings in found.items():
        assert {key: json.loads(strings[key]) for key in ABOUT} == about, fmt


def test_export_default_input_is_the_size_the_checkpoint_was_trained_at(model, tmp_path):
    from reslab.data.transforms import InputSpec
    from reslab.export import default_input_shape

    spec = InputSpec(size=32, source_size=28, channels=1, mean=(0.5,), std=(0.25,), stem="small")
    save_checkpoint(tmp_path / "last.pt", make_payload(model, input=spec.to_dict()))
    assert default_input_shape(reslab.load(tmp_path / "last.pt")) == (1, 32, 32)
    save_checkpoint(tmp_path / "bare.pt", make_payload(model))  # records no input: the default
    assert default_input_shape(reslab.load(tmp_path / "bare.pt")) == (1, 28, 28)


def test_export_to_a_folder_or_an_unwritable_place_is_one_line(model, tmp_path, capsys):
    from reslab.cli import main

    save_checkpoint(tmp_path / "last.pt", make_payload(model))
    for out in (tmp_path, "/proc/reslab-export/m.pt"):  # a folder; a read-only file system
        code = main(["export", str(tmp_path / "last.pt"), "--format=torchscript", f"--out={out}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("reslab: error: ") and "--out" in err, err
        assert err.count("\n") == 1, err
