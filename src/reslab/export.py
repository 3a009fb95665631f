"""Export a model to ONNX, safetensors or TorchScript, and load a model from a file.

safetensors files carry the model's registry name, constructor arguments and whether batch
norm was folded in their string metadata, so :func:`load` rebuilds the model from the file
alone, as it does from a reslab checkpoint.

What a served model must answer with travels into every format (:data:`ABOUT`): the class
names, the input transform (size, resize and centre crop, mean, std, channels) and the
pretrained weights' source, each a JSON string: safetensors metadata, ONNX metadata_props,
TorchScript extra files. :func:`load` puts them on the model as ``model.about``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from reslab.engine.checkpoint import atomic_write, load_checkpoint, model_from_checkpoint
from reslab.errors import ReslabError
from reslab.fast import fold_batchnorm
from reslab.models import create_model

FORMATS = ("onnx", "safetensors", "torchscript")
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".pt"}
METADATA_FORMAT = "reslab-safetensors"
# a checkpoint's entries that go into every export, as JSON strings under these keys
ABOUT = ("classes", "input", "weights")


def about_strings(model: nn.Module) -> dict[str, str]:
    """``model.about`` (set by :func:`load`) as the JSON strings every format stores."""
    about = getattr(model, "about", {})
    return {key: json.dumps(about[key]) for key in ABOUT if about.get(key) is not None}


def about_from_strings(strings: dict[str, str]) -> dict:
    return {key: json.loads(strings[key]) for key in ABOUT if key in strings}


def _spec(model: nn.Module) -> dict:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ReslabError("the model has no .spec; build it with reslab.create_model")
    return spec


def save_safetensors(model: nn.Module, path: str | Path, folded: bool = False) -> Path:
    """Weights plus ``format``/``name``/``kwargs``/``folded`` metadata (strings only)."""
    spec = _spec(model)
    metadata = {
        "format": METADATA_FORMAT,
        "name": spec["name"],
        "kwargs": json.dumps(spec["kwargs"], sort_keys=True),
        "folded": json.dumps(folded),
        **about_strings(model),
    }
    # contiguous NCHW copies: the file must not depend on the model's memory format
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def load_safetensors(path: str | Path) -> nn.Module:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ReslabError(f"{path} is not a readable safetensors file ({error})") from None
    if metadata.get("format") != METADATA_FORMAT:
        raise ReslabError(
            f"{path} has no reslab metadata (model name and arguments); load its tensors with "
            "safetensors.torch.load_file into a model built with reslab.create_model"
        )
    model = create_model(metadata["name"], **json.loads(metadata["kwargs"]))
    spec = model.spec
    if json.loads(metadata.get("folded", "false")):
        model = fold_batchnorm(model)  # the same structure the weights were folded into
        model.spec = spec
    model.load_state_dict(state_dict, strict=True)
    model.about = about_from_strings(metadata)
    return model.eval()


def load(path: str | Path) -> nn.Module:
    """Rebuild a model from a reslab ``.safetensors`` file or a reslab checkpoint (or its folder).

    The model comes back in eval mode, on the CPU, in fp32, with ``model.about``: the class
    names, input transform and pretrained weights' source the file records (:data:`ABOUT`).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload).eval()
    model.about = {key: payload[key] for key in ABOUT if payload.get(key) is not None}
    return model


def export_onnx(
    model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], batch: int = 2
) -> dict:
    """Write an ONNX file with a dynamic batch axis; compare onnxruntime with torch.

    Returns ``{"max_abs_diff", "max_abs_output"}`` on a random batch of a size other than the
    export's, so the check also exercises the dynamic axis.
    """
    import onnxruntime

    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(batch, *input_shape)
    # the dynamo-based exporter (torch >= 2.5); the batch dimension stays symbolic
    program = torch.onnx.export(
        model,
        (example,),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=["images"],
        output_names=["logits"],
        dynamo=True,
        verbose=False,
    )
    program.model.metadata_props.update(about_strings(model))
    # written beside ``path`` and renamed once whole, as atomic_write does
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    check = torch.randn(batch + 1, *input_shape)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": check.numpy()})
    with torch.no_grad():
        expected = model(check).numpy()
    return {
        "max_abs_diff": float(np.abs(got - expected).max()),
        "max_abs_output": float(np.abs(expected).max()),
    }


def export_torchscript(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int]):
    """A traced TorchScript file (the graph of a ResNet has no data-dependent control flow)."""
    model = model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, *input_shape))
    extra = about_strings(model)
    return atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files=extra))


def default_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """C,H,W for export: the side the checkpoint's input transform gives the model
    (``model.about``, from :func:`load`), else 28x28 for 1-channel models (Fashion-MNIST) and
    224x224 for others."""
    channels = model.conv1.in_channels
    spec = getattr(model, "about", {}).get("input")
    size = spec["size"] if spec else (28 if channels == 1 else 224)
    return channels, size, size
