"""`reslab predict CKPT IMAGE...`: the top classes of each image file."""

from __future__ import annotations

import argparse
import sys

from PIL import Image

from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.inference import predict_files
from reslab.errors import ReslabError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify image files with a checkpoint",
        description="Top-k classes with probabilities for PNG/JPEG files of any size or mode, "
        "converted to the model's input the way training saw its images.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a .pt file or a run folder")
    parser.add_argument("images", metavar="IMAGE", nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    add_inference_flags(parser, default_precision="auto")
    parser.set_defaults(func=run)


def add_inference_flags(parser: argparse.ArgumentParser, default_precision: str) -> None:
    """--precision and --compile of the inference fast path (batch norm folded, channels_last)."""
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=default_precision,
        help="auto = bf16 on CPUs with AMX (only there expected to beat fp32), else fp32 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first: pays off only for many images",
    )


def conversion_note(path: str, spec: dict) -> str | None:
    """A notice when an image's mode or size differs from what the model was trained on."""
    channels, size = spec.get("channels"), spec.get("source_size")
    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
    except (OSError, SyntaxError, ValueError):
        return None  # unreadable: reading it for real reports the error
    wanted_mode = "L" if channels == 1 else "RGB"
    if mode == wanted_mode and width == height == size:
        return None
    kind = "grayscale" if channels == 1 else "RGB"
    return (
        f"note: {path} is {mode} {width}x{height}; converted to {kind} {size}x{size} "
        "as the training images were"
    )


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ReslabError(f"--top-k must be >= 1, got {args.top_k}")
    payload = load_checkpoint(args.checkpoint)
    for path in args.images:
        note = conversion_note(path, payload.get("input", {}))
        if note:
            print(note, file=sys.stderr)
    results = predict_files(payload, args.images, args.top_k, args.precision, args.compile)
    for path, top in zip(args.images, results, strict=True):
        ranked = ", ".join(f"{name} {100 * p:.1f}%" for name, p in top)
        print(f"{path}: {ranked}")
    return 0
