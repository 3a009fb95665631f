"""`reslab explain CKPT IMAGE...`: Grad-CAM overlays of where a classifier looks."""

from __future__ import annotations

import argparse

from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.inference import explain_files


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM maps of where a classifier looks in image files",
        description="Grad-CAM (Selvaraju et al. 2017) for each image: the map of where the "
        "evidence for a class lies, drawn over the image and written beside it as "
        "NAME.gradcam.png. The model runs in fp32 without test-time views.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a .pt file or a run folder")
    parser.add_argument(
        "images", metavar="IMAGE", nargs="+", help="PNG or JPEG files, any size or mode"
    )
    add_explain_flags(parser)
    parser.set_defaults(func=run)


def add_explain_flags(parser: argparse.ArgumentParser, target: bool = True) -> None:
    """--layer, and --class unless the command explains its own predictions."""
    if target:
        parser.add_argument(
            "--class",
            dest="target",
            metavar="NAME",
            help="explain this class (a name or an index) for every image "
            "(default: each image's predicted class)",
        )
    parser.add_argument(
        "--layer",
        metavar="NAME",
        help="the stage or block whose activations make the map, e.g. layer3 or layer3.0; "
        "earlier ones give finer, less class-specific maps (default: the last stage)",
    )


def print_explained(results) -> None:
    for path, name, probability in results:
        print(f"{path}: {name} {100 * probability:.1f}%")


def run(args: argparse.Namespace) -> int:
    payload = load_checkpoint(args.checkpoint)
    print_explained(explain_files(payload, args.images, args.target, args.layer))
    return 0
