"""`reslab export CKPT --format onnx|safetensors|torchscript`."""

from __future__ import annotations

from pathlib import Path

from reslab.cli.summary import parse_shape
from reslab.errors import ReslabError
from reslab.export import (
    FORMATS,
    SUFFIXES,
    default_input_shape,
    export_onnx,
    export_torchscript,
    load,
    save_safetensors,
)
from reslab.fast import fold_batchnorm

# onnxruntime must reproduce torch's fp32 outputs this closely (relative to the largest output
# once that exceeds 1: a random-init ResNet-50 has logits in the tens, and its sums of 10^4
# products differ by ~1e-4 between two correct fp32 implementations), or the file is removed
ONNX_TOLERANCE = 1e-4


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as ONNX, safetensors or TorchScript",
        description="Export a reslab checkpoint (or .safetensors file). ONNX has a dynamic "
        "batch axis and is checked against torch with onnxruntime on a random batch; "
        "safetensors keeps the model name and arguments so reslab.load(path) rebuilds it.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint file, run folder or .safetensors")
    parser.add_argument(
        "--format", choices=FORMATS, default="onnx", help="what to write (default %(default)s)"
    )
    parser.add_argument("--fold-bn", action="store_true", help="fold batch norm into the convs")
    parser.add_argument(
        "--input",
        type=parse_shape,
        help="C,H,W to trace with (default: the model's channels at the checkpoint's input size)",
    )
    parser.add_argument("--out", type=Path, help="output file (default: beside the checkpoint)")
    parser.set_defaults(func=run)


def run(args) -> int:
    model = load(args.checkpoint)
    spec = model.spec
    if args.fold_bn:
        model = fold_batchnorm(model)
        model.spec = spec
    shape = args.input or default_input_shape(model)
    if shape[0] != model.conv1.in_channels:
        raise ReslabError(
            f"the model takes {model.conv1.in_channels} channel(s), --input has {shape[0]}"
        )
    source = args.checkpoint / "last.pt" if args.checkpoint.is_dir() else args.checkpoint
    out = args.out or source.with_suffix(SUFFIXES[args.format])
    if out.resolve() == source.resolve():
        raise ReslabError(f"--out {out} would overwrite the checkpoint; choose another name")
    if out.is_dir():
        raise ReslabError(f"--out {out} is a folder; give a file name, such as {out / source.stem}")
    try:
        write(args, model, out, shape)
    except OSError as error:
        raise ReslabError(
            f"cannot write --out {out} ({error.strerror or error}); choose a writable place"
        ) from None
    print(f"wrote {out}")
    return 0


def write(args, model, out: Path, shape: tuple[int, int, int]) -> None:
    """Write ``model`` to ``out`` in ``args.format``; ONNX is checked against torch."""
    if args.format == "onnx":
        check = export_onnx(model, out, shape)
        diff, limit = check["max_abs_diff"], ONNX_TOLERANCE * max(1.0, check["max_abs_output"])
        print(
            f"onnxruntime vs torch on a random batch: max abs difference {diff:.2e} "
            f"(largest output {check['max_abs_output']:.3g}, limit {limit:.1e})"
        )
        if diff > limit:
            out.unlink()
            raise ReslabError(f"ONNX output differs by {diff:.2e} (> {limit:.1e}); not written")
    elif args.format == "safetensors":
        save_safetensors(model, out, folded=args.fold_bn)
    else:
        export_torchscript(model, out, shape)
