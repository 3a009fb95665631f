"""`reslab predict CKPT IMAGE...`: the top classes of each image file."""

from __future__ import annotations

import argparse
import sys

from PIL import Image

from reslab.cli.explain import add_explain_flags, print_explained
from reslab.data.folders import UNREADABLE
from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.inference import explain_files, predict_files
from reslab.errors import ReslabError
from reslab.precision import BF16_MIN_SPEEDUP, PRECISIONS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify image files with a checkpoint",
        description="Top-k classes with probabilities for PNG/JPEG files of any size or mode, "
        "converted to the model's input the way training saw its images.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a .pt file or a run folder")
    parser.add_argument(
        "images", metavar="IMAGE", nargs="+", help="PNG or JPEG files, any size or mode"
    )
    parser.add_argument(
        "--top-k", type=int, default=3, help="classes to list per image (default %(default)s)"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also write a Grad-CAM overlay of the top class beside each image, as "
        "NAME.gradcam.png (`reslab explain` does only that; default: off)",
    )
    add_inference_flags(parser)
    add_explain_flags(parser, target=False)
    parser.set_defaults(func=run)


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    """--precision, default auto, resolved by reslab.precision's one rule."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 = bfloat16, slow without native bf16 (AVX512-BF16 or AMX); auto = fp32, "
        "unless bf16 is native here and a forward pass timed in each is at least "
        f"{BF16_MIN_SPEEDUP:g}x faster in bf16, or timing cannot tell and the CPU has AMX "
        "(default: %(default)s)",
    )


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """--precision and --compile of the inference fast path (batch norm folded, channels_last)."""
    add_precision_flag(parser)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first: pays off only for many images",
    )
    parser.add_argument(
        "--tta-shift",
        type=int,
        metavar="N",
        help="also average over each image moved N pixels right, left, down and up; 0 = off "
        "(default: the checkpoint's training setting)",
    )


# up to this many images that differ from the training images get a note each; more get one
# note for all, so that a folder of photos does not bury the results under a line per file
NOTES_EACH = 3


def conversion_notes(paths: list[str], spec: dict) -> list[str]:
    """Notices for the images whose mode or size differs from what the model was trained on:
    one per image for a few, one summary line for many."""
    channels, size = spec.get("channels"), spec.get("source_size")
    wanted_mode = "L" if channels == 1 else "RGB"
    differing = []  # (path, mode, width, height)
    for path in paths:
        try:
            with Image.open(path) as image:
                mode, (width, height) = image.mode, image.size
        except UNREADABLE:
            continue  # unreadable: reading it for real reports the error
        if mode != wanted_mode or not width == height == size:
            differing.append((path, mode, width, height))
    wanted = f"{'grayscale' if channels == 1 else 'RGB'} {size}x{size}"
    how = wanted
    if spec.get("resize"):
        how += f" (shorter side resized to {spec['resize']}, centre crop)"
    if len(differing) <= NOTES_EACH:
        return [
            f"note: {path} is {mode} {width}x{height}; converted to {how} "
            "as the training images were"
            for path, mode, width, height in differing
        ]
    modes = sorted({mode for _, mode, _, _ in differing})
    areas = [(width * height, f"{width}x{height}") for _, _, width, height in differing]
    smallest, largest = min(areas)[1], max(areas)[1]
    sizes = smallest if smallest == largest else f"{smallest} to {largest}"
    return [
        f"note: {len(differing)} of {len(paths)} images are not {wanted} "
        f"(mode{'s' if len(modes) > 1 else ''} {', '.join(modes)}, "
        f"size {sizes}); each was converted to {how} as the training images were"
    ]


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ReslabError(f"--top-k must be >= 1, got {args.top_k}")
    if args.layer is not None and not args.explain:
        raise ReslabError("--layer applies to the Grad-CAM maps of --explain; add --explain")
    payload = load_checkpoint(args.checkpoint)
    for note in conversion_notes(args.images, payload.get("input", {})):
        print(note, file=sys.stderr)
    results = predict_files(
        payload, args.images, args.top_k, args.precision, args.compile, args.tta_shift
    )
    for path, top in zip(args.images, results, strict=True):
        ranked = ", ".join(f"{name} {100 * p:.1f}%" for name, p in top)
        print(f"{path}: {ranked}")
    if args.explain:
        top = [payload["classes"].index(ranked[0][0]) for ranked in results]
        print_explained(explain_files(payload, args.images, top, args.layer))
    return 0
