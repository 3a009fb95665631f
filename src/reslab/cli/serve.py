"""`reslab serve RUN_OR_CHECKPOINT`: a local page and JSON API for one model."""

from __future__ import annotations

import argparse
import functools

from reslab.cli.predict import add_precision_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="a local web page and JSON API for a checkpoint",
        description="Serve a classifier (or a detector) on a page where an image can be "
        "dropped, and on a JSON API: POST /predict (an image file -> classes and "
        "probabilities), GET /health. Requests arriving together are classified as one batch. "
        "Ctrl-C stops the server.",
    )
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a .pt file or a run folder")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port; 0 = any free one (default %(default)s)"
    )
    add_precision_flag(parser)
    parser.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the inference fast path: batch norm folded, channels_last (default: on)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="most uploads classified in one forward pass (default %(default)s)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long the first upload of a batch waits for others, in ms (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads the model runs on; the event loop shares the same cores "
        "(default 0: torch's default, one per core)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reslab.errors import finite_positive
    from reslab.serve import serve

    finite_positive("max-wait-ms", args.max_wait_ms, allow_zero=True)
    say = functools.partial(print, flush=True)
    serve(
        args.source,
        args.host,
        args.port,
        args.precision,
        args.fast,
        args.max_batch,
        args.max_wait_ms / 1000,
        args.threads,
        say,
    )
    return 0
