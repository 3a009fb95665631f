"""`reslab predict CKPT IMAGE...`: the top classes of each image file."""

from __future__ import annotations

import argparse

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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ReslabError(f"--top-k must be >= 1, got {args.top_k}")
    payload = load_checkpoint(args.checkpoint)
    results = predict_files(payload, args.images, args.top_k)
    for path, top in zip(args.images, results, strict=True):
        ranked = ", ".join(f"{name} {100 * p:.1f}%" for name, p in top)
        print(f"{path}: {ranked}")
    return 0
