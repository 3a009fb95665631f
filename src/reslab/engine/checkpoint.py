"""Self-describing checkpoints, written atomically and loaded without running pickled code.

A checkpoint is a plain dict (see :func:`make_payload`): the model's registry name and
constructor arguments, its weights, and whatever the writer adds (optimizer, schedule, epoch,
step, RNG states, run config, class names). ``torch.load(weights_only=True)`` reads it, so a file
that would need arbitrary code to load is refused rather than executed.
"""

from __future__ import annotations

import argparse
import os
import pickle
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


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename.

    A crash at any instant leaves either the old file or the new one, never half of one.
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    return atomic_write(path, lambda f: torch.save(payload, f))


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
