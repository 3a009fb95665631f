"""Transfer pays, offline: fine-tuning a network pretrained here against training it from
scratch, on a small folder of a different task.

    .venv/bin/python benchmarks/transfer.py                       # 3 seeds, 20 images a class
    .venv/bin/python benchmarks/transfer.py --seeds 0 1 2 3 4 --per-class 10
    .venv/bin/python benchmarks/transfer.py --set-finetune lr=0.003 freeze_lr=0.006 \
        --set-scratch optimizer=adamw lr=0.003 weight_decay=0.01     # other rates for each

The source task is five Fashion-MNIST classes (T-shirt/top, Trouser, Pullover, Dress, Coat);
the target task is the other five (Sandal, Shirt, Sneaker, Bag, Ankle boot), which the
pretrained network never saw: ``--per-class`` training images each, drawn per seed from the
training set, scored on every test image of those classes (5,000), or on
``--test-per-class`` of each, the same for every run. Both are image folders of
PNGs, written to a temporary folder, so the runs read them as a user's folder would.

1. Pretrain reslab's default network (ResNet-18 at 1/4 width, small stem) on the source.
2. For each seed, on the target folder with the same network, batch and epochs:
   - from scratch, with the recipe reslab plans for a folder that size;
   - fine-tuned from the pretrained run (``weights``), the finetune preset's phases and
     rates, batch norm frozen in the frozen epochs;
   - the same with ``train_bn`` (batch norm training while the body is frozen).

Writes benchmarks/results/transfer-<time>.json (every run's test accuracy, the means and
standard deviations, the machine and the load average at the start and end: the machine may
be shared) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from torchvision.io import write_png

from reslab.bench import machine_info
from reslab.data import fashion_mnist
from reslab.engine.config import PRESETS, build_config, parse_overrides
from reslab.engine.train import fit

RESULTS = Path(__file__).parent / "results"
SOURCE = (0, 1, 2, 3, 4)
TARGET = (5, 6, 7, 8, 9)
# the target runs: one network and one budget for all; the rates of each recipe
MODEL = {"model": "resnet18", "model_kwargs": {"stem": "small", "width": 0.25}}
FINETUNE = {
    k: PRESETS["finetune"][k]
    for k in ("freeze_lr", "lr", "lr_spread", "optimizer", "weight_decay", "warmup")
}


def write_folder(root: Path, split, classes, per_class: int | None, seed: int) -> int:
    """``per_class`` images (None: all) of each of ``classes`` as root/<class>/<i>.png, drawn
    with ``seed``; returns how many were written."""
    g = torch.Generator().manual_seed(seed)
    written = 0
    for c in classes:
        index = (split.labels == c).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=g)][:per_class]
        folder = root / fashion_mnist.CLASSES[c].replace("/", "-")
        folder.mkdir(parents=True)
        for i in index.tolist():
            write_png(split.images[i][None], str(folder / f"{i}.png"))
        written += len(index)
    return written


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def run(values: dict) -> dict:
    config = build_config("default", **values)
    result = fit(config, console=quiet())
    return {"test_acc": result.test_accuracy, "seconds": result.seconds}


def summary(runs: list[dict]) -> dict:
    accuracies = [r["test_acc"] for r in runs]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return {"mean": statistics.mean(accuracies), "stdev": spread, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=20, help="target training images")
    parser.add_argument("--epochs", type=int, default=10, help="target epochs, every recipe")
    parser.add_argument("--freeze-epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        help="target test images a class, the same for every run (default: all 1,000)",
    )
    parser.add_argument("--pretrain-per-class", type=int, default=1200)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    for recipe in ("scratch", "finetune"):
        parser.add_argument(
            f"--set-{recipe}",
            nargs="*",
            default=[],
            metavar="KEY=VALUE",
            help=f"config values for the {recipe} runs over the recipe's own (JSON, else strings)",
        )
    args = parser.parse_args()
    scratch_set, finetune_set = (
        parse_overrides(args.set_scratch),
        parse_overrides(args.set_finetune),
    )
    machine = machine_info()
    train, test = fashion_mnist.load("train"), fashion_mnist.load("test")
    common = dict(MODEL, image_size=28, precision="fp32", max_minutes=0.0, tta=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root / "source/train", train, SOURCE, args.pretrain_per_class, 0)
        write_folder(root / "source/val", test, SOURCE, 200, 0)
        started = time.perf_counter()
        pretrained = root / "pretrained"
        source_run = run(
            dict(
                common,
                data=str(root / "source"),
                epochs=args.pretrain_epochs,
                batch_size=64,
                lr=0.05,  # the default recipe's 0.2 at batch 256, scaled to 64
                out=str(pretrained),
            )
        )
        source_run["seconds_total"] = time.perf_counter() - started
        recipes = {"scratch": [], "finetune": [], "finetune_train_bn": []}
        for seed in args.seeds:
            target = root / f"target-{seed}"
            write_folder(target / "train", train, TARGET, args.per_class, seed)
            n_test = write_folder(target / "val", test, TARGET, args.test_per_class, 0)
            budget = dict(
                common, data=str(target), epochs=args.epochs, batch_size=args.batch, seed=seed
            )
            scratch_lr = PRESETS["default"]["lr"] * args.batch / PRESETS["default"]["batch_size"]
            tuned = dict(budget, **FINETUNE, weights=str(pretrained))
            tuned["freeze_epochs"] = args.freeze_epochs
            tuned.update(finetune_set)
            for name, values in (
                ("scratch", {**budget, "lr": scratch_lr, **scratch_set}),
                ("finetune", tuned),
                ("finetune_train_bn", dict(tuned, train_bn=True)),
            ):
                outcome = run(dict(values, out=str(root / f"{name}-{seed}")))
                recipes[name].append({"seed": seed, **outcome})
                print(f"seed {seed} {name}: {100 * outcome['test_acc']:.2f}%", flush=True)
    result = {
        "task": "transfer",
        "source_classes": [fashion_mnist.CLASSES[c] for c in SOURCE],
        "target_classes": [fashion_mnist.CLASSES[c] for c in TARGET],
        "per_class": args.per_class,
        "test_images": n_test,
        "epochs": args.epochs,
        "freeze_epochs": args.freeze_epochs,
        "batch_size": args.batch,
        "model": MODEL,
        "finetune_rates": {**FINETUNE, **finetune_set},
        "scratch_set": scratch_set,
        "pretrain": {
            "per_class": args.pretrain_per_class,
            "epochs": args.pretrain_epochs,
            **source_run,
        },
        "recipes": {name: summary(runs) for name, runs in recipes.items()},
        "machine": machine,
        "load_average_end": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"transfer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"pretrained on the source: {100 * source_run['test_acc']:.2f}%")
    print(f"{'target recipe':<20}{'mean':>8}{'sd':>7}  ({len(args.seeds)} seeds)")
    for name, s in result["recipes"].items():
        print(f"{name:<20}{100 * s['mean']:>7.2f}%{100 * s['stdev']:>7.2f}")
    print(f"load average {machine['load_average_start']} -> {result['load_average_end']}; {out}")


if __name__ == "__main__":
    main()
