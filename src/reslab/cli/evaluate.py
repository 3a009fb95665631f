"""`reslab eval CKPT`: test accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reslab.cli.predict import add_inference_flags
from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.evaluate import Evaluation
from reslab.engine.inference import evaluate_checkpoint
from reslab.engine.plots import save_figure, top_losses_figure
from reslab.errors import ReslabError, check_whole


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on its test set",
        description="Accuracy, per-class accuracy and confusion matrix of a checkpoint, on the "
        "data it was trained with (Fashion-MNIST's test split, or the folder's validation "
        "images) or on --data FOLDER.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a .pt file or a run folder")
    parser.add_argument("--data", metavar="FOLDER", help="an ImageFolder tree to evaluate on")
    parser.add_argument("--data-dir", help="where the Fashion-MNIST files are")
    parser.add_argument(
        "--batch-size", type=int, default=500, help="images per forward pass (default %(default)s)"
    )
    parser.add_argument(
        "--top-losses",
        type=int,
        default=0,
        metavar="N",
        help="also draw the N test images with the highest loss, each with its predicted "
        "class, probability and true class, into top_losses.png in the run folder (the "
        "checkpoint's folder); 0 = off (default %(default)s)",
    )
    add_inference_flags(parser)
    parser.set_defaults(func=run)


def print_evaluation(console: Console, evaluation: Evaluation, classes: list[str]) -> None:
    table = Table(title="per-class accuracy and confusion (rows: true, columns: predicted)")
    table.add_column("class")
    table.add_column("acc %", justify="right")
    for i in range(len(classes)):
        table.add_column(str(i), justify="right")
    for i, name in enumerate(classes):
        table.add_row(
            f"{i} {name}",
            f"{100 * evaluation.per_class[i].item():.1f}",
            *(str(int(c)) for c in evaluation.confusion[i]),
        )
    console.print(table)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ReslabError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_whole("top-losses", args.top_losses, least=0)
    payload = load_checkpoint(args.checkpoint)
    evaluation, description = evaluate_checkpoint(
        payload,
        data=args.data,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        shift=args.tta_shift,
        top=args.top_losses,
    )
    console = Console()
    console.print(f"data: {description}", markup=False, highlight=False)
    print_evaluation(console, evaluation, payload["classes"])
    console.print(
        f"test accuracy {100 * evaluation.accuracy:.2f}%  loss {evaluation.loss:.4f}  "
        f"({int(evaluation.confusion.sum())} images, {evaluation.views} test-time "
        f"view{'s' if evaluation.views > 1 else ''} each)",
        markup=False,
        highlight=False,
    )
    if evaluation.top_losses is not None:
        folder = Path(args.checkpoint)
        path = (folder if folder.is_dir() else folder.parent) / "top_losses.png"
        save_figure(top_losses_figure(evaluation.top_losses, payload["classes"]), path)
        console.print(f"top losses: {path}", markup=False, highlight=False)
    return 0
