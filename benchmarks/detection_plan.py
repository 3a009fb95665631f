"""The planned detection recipe against detectron2's defaults on a COCO set unlike the scenes,
and against the scenes' own hand-made recipe on the scenes.

    .venv/bin/python benchmarks/detection_plan.py [--minutes 10] [--out runs/detplan]
    .venv/bin/python benchmarks/detection_plan.py --set scenes --minutes 30 \
        --recipes planned,scenes_flags --out runs/detplan-scenes

Makes a COCO-format set here that differs from the Fashion-MNIST scenes in every way the
planner reads (other image size, smaller objects, few images, category ids that are not 1..K,
empty images, files in subfolders), then trains on it twice with `python -m reslab detect
train --images --annotations --max-minutes M` and nothing else: once with the planned recipe,
once with `--recipe detectron2`, one after the other, and scores each on the set's val split
with `python -m reslab detect eval`. ``--set scenes`` trains on the Fashion-MNIST scenes
instead (8,000 at 128 px, as `benchmarks/detection.py train` makes them), where
``scenes_flags`` is the fifteen-flag recipe that benchmark spells out. Writes
``benchmarks/results/detection-plan-<time>.json`` with the machine, the load average at the
start and the end, each run's plan, steps, wall time and COCO metrics, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torchvision.io import write_png

from reslab.bench import machine_info
from reslab.data.scenes import SceneConfig, make_scenes

RESULTS = Path(__file__).parent / "results"
# smaller objects on larger canvases than the scenes' (0.2-0.45 of 128 px), at most 4 each
SET = SceneConfig(images=240, size=192, max_items=4, min_scale=0.1, max_scale=0.25, seed=5)
EMPTY = 0.1  # this share of empty images added to each split
SCENES = SceneConfig(images=8000, size=128, seed=0)  # benchmarks/detection.py's scenes
# the scenes recipe of benchmarks/detection.py train, as `reslab detect train` flags
SCENES_FLAGS = [
    "--backbone", "resnet18", "--width", "0.25", "--batch-size", "8", "--min-size", "256",
    "--max-size", "256", "--anchor-sizes", "32,64,128,256", "--lr", "0.16",
    "--rois-per-image", "8", "--roi-positive-fraction", "0.75", "--train-pre-nms", "600",
    "--train-proposals", "300", "--test-proposals", "100", "--warmup-iters", "100",
    "--epochs", "40", "--processes", "0", "--rescore-minutes", "4", "--pretrain-minutes", "6",
    "--pretrain-jitter", "0.1",
]  # fmt: skip
RECIPES = {
    "planned": [],
    "detectron2": ["--recipe", "detectron2"],
    "scenes_flags": SCENES_FLAGS,
}


def category_id(label: int) -> int:
    """Original ids that are not 1..K: 3, 10, 17, ..."""
    return 3 + 7 * (label - 1)


def scenes_as_coco(root: Path, config: SceneConfig) -> dict[str, dict]:
    """The scenes made under ``root``, as {split: COCO document} with file names relative to
    ``root`` (the image folder of both splits)."""
    documents = {}
    for split, path in make_scenes(root, config).items():
        data = json.loads(Path(path).read_text())
        for image in data["images"]:
            image["file_name"] = f"{split}/{image['file_name']}"
        documents[split] = data
    return documents


def write_sets(root: Path, documents: dict[str, dict]) -> dict:
    """Each split's document as ``root/<split>.json``; returns {split: json path}."""
    paths = {split: root / f"{split}.json" for split in documents}
    for split, data in documents.items():
        paths[split].write_text(json.dumps(data))
    return {split: str(path) for split, path in paths.items()}


def scene_set(root: Path, config: SceneConfig) -> dict:
    """The scenes as made; returns {split: json path}."""
    return write_sets(root, scenes_as_coco(root, config))


def make_set(root: Path, config: SceneConfig) -> dict:
    """The scenes written as a user's COCO set: ids remapped, file names under their split's
    folder (the image folder is ``root``), empty canvases added. Returns {split: json path}."""
    documents = scenes_as_coco(root, config)
    for split, data in documents.items():
        for category in data["categories"]:
            category["id"] = category_id(category["id"])
        for ann in data["annotations"]:
            ann["category_id"] = category_id(ann["category_id"])
        first = max(image["id"] for image in data["images"]) + 1
        for k in range(max(1, round(EMPTY * len(data["images"])))):
            name = f"{split}/empty{k:03d}.png"
            write_png(torch.zeros(1, config.size, config.size, dtype=torch.uint8), str(root / name))
            data["images"].append(
                {"id": first + k, "file_name": name, "width": config.size, "height": config.size}
            )
    return write_sets(root, documents)


def reslab(*argv: str, log: Path) -> float:
    """Run ``python -m reslab ARGV``, its output to ``log``; the wall seconds."""
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "reslab", *argv], stdout=out, stderr=out)
    if done.returncode:
        raise SystemExit(f"detection_plan.py: {' '.join(argv[:2])} failed; see {log}")
    return time.monotonic() - started


def train_and_score(name: str, root: Path, sets: dict, minutes: float, out: Path) -> dict:
    run = out / name
    data = ["--images", str(root), "--annotations", sets["train"]]
    train = reslab(
        "detect", "train", *data, "--max-minutes", f"{minutes:g}", "--out", str(run),
        *RECIPES[name], log=out / f"{name}-train.log",
    )  # fmt: skip
    metrics_file = out / f"{name}-metrics.json"
    evaluate = reslab(
        "detect", "eval", str(run), "--images", str(root), "--annotations", sets["val"],
        "--json", str(metrics_file), log=out / f"{name}-eval.log",
    )  # fmt: skip
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    metrics = json.loads(metrics_file.read_text())
    metrics.pop("confusion", None)
    return {
        "command_flags": RECIPES[name],
        "train_seconds": train,
        "eval_seconds": evaluate,
        "steps": checkpoint["step"],
        "detector": checkpoint["model"]["kwargs"],
        "train": checkpoint["train_config"],
        "plan": checkpoint.get("plan"),
        "metrics": metrics,
    }


def report(console: Console, result: dict) -> None:
    where = (
        "the scenes" if result["set"].get("name") == "scenes" else "a COCO set unlike the scenes"
    )
    table = Table(title=f"detect train --max-minutes {result['minutes']:g} on {where}")
    # the planned recipe is compared with the first other recipe of the run
    other = next((name for name in result["runs"] if name != "planned"), "detectron2")
    for column in ("recipe", "steps", "train min", "mAP@.5", "mAP@[.5:.95]", f"vs {other}"):
        table.add_column(column, justify="right")
    base = result["runs"].get(other, {}).get("metrics", {}).get("mAP50")
    for name, run in result["runs"].items():
        m = run["metrics"]
        ratio = "-"
        if name == "planned" and base is not None:
            ratio = f"{m['mAP50'] - base:+.3f}" + (f" ({m['mAP50'] / base:.2f}x)" if base else "")
        table.add_row(
            name, str(run["steps"]), f"{run['train_seconds'] / 60:.1f}",
            f"{m['mAP50']:.3f}", f"{m['mAP']:.3f}", ratio,
        )  # fmt: skip
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="default %(default)s")
    parser.add_argument("--out", default="runs/detplan", help="default %(default)s")
    parser.add_argument(
        "--set",
        choices=("unlike", "scenes"),
        default="unlike",
        help="unlike: a COCO set unlike the scenes; scenes: the Fashion-MNIST scenes "
        "(default %(default)s)",
    )
    parser.add_argument("--images", type=int, default=None, help="training images")
    parser.add_argument(
        "--recipes",
        default="planned,detectron2",
        help=f"which of {','.join(RECIPES)} to run, in order (default %(default)s)",
    )
    parser.add_argument("--note", default="", help="recorded in the result")
    args = parser.parse_args()
    console = Console()
    info = machine_info()
    out = Path(args.out)
    base = SCENES if args.set == "scenes" else SET
    config = replace(base, images=args.images or base.images)
    root = out / "data"
    sets = scene_set(root, config) if args.set == "scenes" else make_set(root, config)
    names = args.recipes.split(",")
    if not set(names) <= set(RECIPES):
        parser.error(f"--recipes takes {','.join(RECIPES)}, got {args.recipes}")
    runs = {name: train_and_score(name, root, sets, args.minutes, out) for name in names}
    result = {
        "kind": "plan",
        "machine": info,
        "load_average_end": os.getloadavg(),
        "note": args.note or "2 cores shared with other work; see the load averages",
        "minutes": args.minutes,
        "set": {**asdict(config), "name": args.set}
        | (
            {"empty_share": EMPTY, "category_ids": "3 + 7 * (k - 1)"}
            if args.set == "unlike"
            else {}
        ),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"detection-plan-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    report(console, result)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
