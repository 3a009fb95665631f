"""`reslab scenes make`: write the Fashion-MNIST scenes detection dataset in COCO format."""

from __future__ import annotations

from reslab.data.scenes import SceneConfig, make_scenes


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "scenes",
        help="make the Fashion-MNIST scenes detection dataset",
        description="Synthetic detection data from real Fashion-MNIST items.",
    )
    actions = parser.add_subparsers(metavar="ACTION", required=True)
    make = actions.add_parser(
        "make",
        help="write train and val scenes (PNG + COCO JSON)",
        description="Canvases with 1-6 Fashion-MNIST items, randomly scaled and placed; boxes "
        "from the items' non-background pixels. Same seed, same files.",
    )
    defaults = SceneConfig()
    make.add_argument("--out", required=True, help="folder to write train/, val/, annotations/")
    make.add_argument(
        "--images",
        type=int,
        default=defaults.images,
        help="training canvases; val gets a fifth as many (default %(default)s)",
    )
    make.add_argument(
        "--size",
        type=int,
        default=defaults.size,
        help="canvas side in pixels (default %(default)s)",
    )
    make.add_argument(
        "--max-items",
        type=int,
        default=defaults.max_items,
        help="most items per canvas (default %(default)s)",
    )
    make.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    make.add_argument("--data-dir", default=None, help="Fashion-MNIST files, if not installed")
    make.set_defaults(func=run)


def run(args) -> int:
    config = SceneConfig(
        images=args.images, size=args.size, max_items=args.max_items, seed=args.seed
    )
    for split, path in make_scenes(args.out, config, args.data_dir).items():
        print(f"{split}: {path}")
    return 0
