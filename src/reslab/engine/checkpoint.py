"""Self-describing checkpoints, written atomically and loaded without running pickled code.

A checkpoint is a plain dict (see :func:`make_payload`): the model's registry name and
constructor arguments, its weights, and whatever the writer adds (optimizer, schedule, epoch,
step, RNG states, run config, class names). ``torch.load(weights_only=True)`` reads it, so a file
that would need arbitrary code to load is refused rather than executed.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.models import create_model

FORMAT = "reslab-checkpoint"
VERSION = 1


def make_payload(model: nn.Module, task: str = "classification", **extra) -> dict:
    """The base of every checkpoint: format tag, model spec and weights, plus ``extra``."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("the model has no .spec; build it with reslab's create_model")
    return {
        "format": FORMAT,
        "version": VERSION,
        "task": task,
        "model": {"name": spec["name"], "kwargs": dict(spec["kwargs"])},
        "state_dict": model.state_dict(),
        **extra,
    }


# atomic_write's temporary files: ``.<name>.<random>.tmp`` beside the file they replace
TEMPORARY_GLOB = ".*.tmp"


def atomic_write(path: str | Path, write, size: int | None = None) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename.

    A crash at any instant leaves either the old file or the new one, never half of one; a
    write that fails leaves the old file and removes the temporary one. A full disk is a
    ``ReslabError`` naming the folder, the space free and ``size``, the bytes needed, if known.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise ReslabError(disk_full(path, size)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def disk_full(path: Path, size: int | None) -> str:
    """The one line for a write that ran out of space: the folder, what is free, what was
    needed (``size`` bytes, when known) and that the previous file is whole."""
    free = shutil.disk_usage(path.parent).free
    needed = f"{size / 1e6:.1f} MB needed, " if size is not None else ""
    kept = f"the previous {path.name} is kept whole" if path.exists() else "nothing was written"
    return (
        f"no space left on the device of {path.parent} writing {path.name} ({needed}"
        f"{free / 1e6:.1f} MB free); {kept}. Free some space and run again"
    )


def non_finite_tensors(state_dict: dict) -> list[str]:
    """The names of the floating-point tensors of ``state_dict`` that hold inf or nan."""
    return [
        name
        for name, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all()
    ]


def check_finite(payload: dict, what: str) -> None:
    """Refuse a payload whose weights or batch-norm statistics (``state_dict``, and the raw
    ``train_state_dict`` an averaged run also keeps) hold inf or nan: ``what`` says what was
    being done with it."""
    bad = non_finite_tensors(payload.get("state_dict", {}))
    bad += non_finite_tensors(payload.get("train_state_dict", {}))
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ReslabError(
            f"{what}: {len(bad)} of the model's tensors hold inf or nan ({names}); the weights "
            "diverged (likely a learning rate too high: try a lower --lr, or --precision fp32)"
        )


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` atomically if every parameter and buffer is finite; otherwise raise
    a ``ReslabError`` and leave the previous file as it was."""
    path = Path(path)
    kept = "the previous one stays" if path.exists() else "none written yet"
    check_finite(payload, f"not saving {path} ({kept})")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    return atomic_write(path, lambda f: f.write(data), len(data))


# the first byte of every pickle since protocol 2: torch.save's legacy, pre-zip format
PICKLE_PROTO = b"\x80"
ZIP_MAGIC = b"PK\x03\x04"  # a zip file's first local header: torch.save's format


def checkpoint_file(path: str | Path) -> Path:
    """``path``, or the last.pt (else best.pt) of a run folder."""
    path = Path(path)
    if path.is_dir():
        for name in ("last.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
        raise ReslabError(f"{path} is a folder with no last.pt or best.pt in it")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint; every way a file can be wrong is a one-line ``ReslabError``."""
    path = checkpoint_file(path)
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ReslabError(
            f"{path} is not a reslab checkpoint (no '{FORMAT}' tag); a bare state dict can be "
            "loaded into a model built with reslab.create_model"
        )
    return payload


def read_torch_file(path: Path):
    """What ``torch.save`` wrote to ``path``, read without running pickled code; a missing,
    truncated or foreign file is a one-line ``ReslabError``."""
    if not path.is_file():
        raise ReslabError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise ReslabError(
            f"{path} is truncated or not a PyTorch checkpoint (a zip file without its end)"
        )
    if head and not zipfile.is_zipfile(path) and head[:1] != PICKLE_PROTO:
        # the weights-only unpickler would call any other file "objects that need code"
        raise ReslabError(
            f"{path} is not a PyTorch checkpoint (neither torch.save's zip format nor a "
            "pickle); give a .pt file written by reslab train or detect train"
        )
    try:
        with warnings.catch_warnings():
            # on a bare pickle torch warns about its protocol before the refusal below says why
            warnings.simplefilter("ignore", UserWarning)
            # timm's and torchvision's training scripts save their argparse options beside the
            # weights; a Namespace holds plain values, so it is let through
            with torch.serialization.safe_globals([argparse.Namespace]):
                payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ReslabError(
            f"refused to load {path}: it holds Python objects that need arbitrary code to "
            "unpickle. "
            "reslab loads only plain tensors and values; re-save the weights with "
            "torch.save(model.state_dict(), ...) from code you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise ReslabError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(error).__name__})"
        ) from None
    return payload


def require_classifier(
    payload: dict,
    instead: str = "`reslab detect eval` and `reslab detect predict` take detectors",
) -> None:
    """A detector's checkpoint given to a classifier's command (eval, predict, export, train
    --resume): say so, and ``instead`` what to run."""
    if payload.get("task", "classification") != "classification":
        raise ReslabError(
            f"this checkpoint holds a {payload['task']} model ({payload['model']['name']}), not "
            f"an image classifier; {instead}"
        )


def model_from_checkpoint(payload: dict) -> nn.Module:
    """Rebuild the model from a checkpoint's spec and load its weights strictly."""
    require_classifier(payload)
    check_finite(payload, "this checkpoint cannot give meaningful outputs")
    spec = payload["model"]
    model = create_model(spec["name"], **spec["kwargs"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ReslabError(
            f"the checkpoint's weights do not fit {spec['name']} {spec['kwargs']}: "
            + " ".join(lines[1:3])[:300]
        ) from None
    return model
