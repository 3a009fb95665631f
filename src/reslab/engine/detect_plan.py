"""The recipe of `reslab detect train` planned from the data and the machine.

detectron2's defaults are made for 800-pixel COCO images on GPUs; on small images, small
objects and a few CPU cores they leave the anchors missing the objects and the run inside its
warm-up. The plan reads the training set's statistics (:class:`DataStats`) and sets, for every
flag of :data:`~reslab.engine.detect_config.FLAG_FIELDS` that the user did not give:

- the input size: the images scaled so that the median object is about ``OBJECT_SIDE``
  pixels, four cells of the stride-16 map (never smaller than the images, at most 800);
- the anchors: k-means on the log sides and log height:width ratios of the boxes at that size,
  as YOLO9000's dimension clusters and YOLOv5's autoanchor cluster box shapes;
- RoIs per image, their positive share and the proposal counts, from the objects per image and
  the number of anchors;
- the processes, the warm starts and the learning rate, from the machine and the budget;
- then, from one timed training step (:func:`reslab.engine.detect_train.step_seconds`), the
  steps the budget allows, and the warm-up and epochs within them (:func:`fit_schedule`).

The values are a plain dict of flag names, recorded in ``OUT/plan.json`` and the checkpoint.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from reslab.data.coco import CocoDetection, unused_categories
from reslab.engine.detect_config import FLAG_FIELDS, DetectConfig, flag_value, set_flags
from reslab.errors import ReslabError
from reslab.models.detection import BACKBONES
from reslab.precision import format_seconds

# the median object's side in the resized image: 4 cells of the stride-16 map (the scenes
# upsampled to 256 px, items spanning 3-7 cells, scored best; docs/experiments.md)
OBJECT_SIDE = 64
LARGEST_MIN_SIZE = 800  # detectron2's shorter side for COCO
LARGEST_UPSCALE = 4
# on a CPU: at most this shorter side (384-pixel scenes scored below 256-pixel ones in the same
# 30 minutes, docs/experiments.md), unless the median object would fall under two map cells
CPU_SIDE = 320
SMALLEST_OBJECT_SIDE = 32
SIZE_STEP = 32  # input sides are multiples of this
# detectron2 keeps 12000 of the ~63000 anchors of an 800x1333 image before the RPN's NMS
# (50x84 cells x 15 anchors): a fifth; and 2000 after it
PRE_NMS_SHARE = 0.2
# the share of the steps the warm-up takes, and its most (detectron2's 200 iterations)
WARMUP_SHARE = 0.05
WARMUP_MOST = 200
# the epochs leave room for this many times the steps a timed step says the budget allows
EPOCH_ROOM = 10
# the scenes recipe's 6 and 4 of 30 minutes for the warm starts, planned from this budget on
WARM_START_MINUTES = 20
PRETRAIN_SHARE, RESCORE_SHARE = 0.2, 0.13
# a from-scratch detector with trained batch norm took 8x detectron2's 0.02 (0.16 beat 0.04
# and 0.08 on the scenes; docs/experiments.md); with pretrained weights, detectron2's rate
SCRATCH_LR, PRETRAINED_LR = 0.16, 0.02
# processes are started from this budget on: a rank's start costs seconds
PROCESS_MINUTES = 2.0
# the share of the budget a plan fills (the rest: the final checkpoint and evaluation)
BUDGET_SHARE = 0.95


@dataclass
class DataStats:
    """What a training set's annotations say: sizes in the images' own pixels."""

    images: int
    empty_images: int
    short_sides: list[int]  # each image's shorter side
    long_sides: list[int]
    box_sides: list[float]  # each box's sqrt(w * h)
    box_ratios: list[float]  # each box's h / w
    box_image: list[int]  # each box's image, an index into short_sides
    objects: list[int]  # boxes per image
    class_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        """The numbers a plan is printed and recorded with."""
        sides = sorted(self.box_sides)
        return {
            "images": self.images,
            "empty_images": self.empty_images,
            "image_short_side_median": statistics.median(self.short_sides),
            "image_long_side_most": max(self.long_sides),
            "box_side_median": round(statistics.median(sides), 1),
            "box_side_range": [round(sides[0], 1), round(sides[-1], 1)],
            "objects_per_image_mean": round(statistics.fmean(self.objects), 2),
            "objects_per_image_most": max(self.objects),
            "class_counts": self.class_counts,
        }


def data_stats(dataset: CocoDetection) -> DataStats:
    """The statistics of ``dataset``'s non-crowd boxes."""
    short, long, sides, ratios, owner, objects = [], [], [], [], [], []
    if not any(dataset.annotations.values()):
        raise ReslabError(f"{dataset.annotation_file} has no boxes (all crowd?) to plan from")
    counts = dict.fromkeys(dataset.class_names, 0)
    name_of = dict(zip(dataset.category_ids, dataset.class_names, strict=True))
    for index, image in enumerate(dataset.images):
        short.append(min(image["width"], image["height"]))
        long.append(max(image["width"], image["height"]))
        anns = dataset.annotations[image["id"]]
        objects.append(len(anns))
        for ann in anns:
            _, _, w, h = ann["bbox"]
            sides.append(math.sqrt(w * h))
            ratios.append(h / w)
            owner.append(index)
            counts[name_of[ann["category_id"]]] += 1
    return DataStats(
        len(short), objects.count(0), short, long, sides, ratios, owner, objects, counts
    )


def log_kmeans(values: list[float], k: int, rounds: int = 50) -> list[float]:
    """``k`` centres of ``values`` (all positive) by k-means on their logarithms, started at
    evenly spaced quantiles, so the same values give the same centres; ascending. Fewer when
    there are fewer distinct values."""
    x = torch.tensor(values, dtype=torch.float64).log()
    k = max(1, min(k, x.unique().numel()))
    centres = torch.quantile(x, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(rounds):
        nearest = (x[:, None] - centres[None]).abs().argmin(dim=1)
        moved = torch.stack(
            [x[nearest == j].mean() if (nearest == j).any() else centres[j] for j in range(k)]
        )
        if torch.allclose(moved, centres):
            break
        centres = moved
    return sorted(centres.exp().tolist())


def _ceil_to(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def _pow2_at_least(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1))))


def input_size(stats: DataStats, device: str = "cpu") -> tuple[int, int]:
    """(min_size, max_size): the median image scaled so the median box is OBJECT_SIDE pixels,
    at most LARGEST_UPSCALE times and LARGEST_MIN_SIZE on its shorter side, and never below
    the images' own size; on a CPU, whose step time grows with the pixels, the shorter side
    at most CPU_SIDE, unless that leaves the median box under SMALLEST_OBJECT_SIDE. The
    longer side is bounded by the widest image at that scale."""
    short = statistics.median(stats.short_sides)
    box = statistics.median(stats.box_sides)
    scale = min(max(OBJECT_SIDE / box, 1.0), LARGEST_UPSCALE)
    if device == "cpu":
        scale = min(scale, max(CPU_SIDE / short, SMALLEST_OBJECT_SIDE / box))
    min_size = min(_ceil_to(short * scale, SIZE_STEP), LARGEST_MIN_SIZE)
    aspect = max(lo / sh for lo, sh in zip(stats.long_sides, stats.short_sides, strict=True))
    return min_size, min(_ceil_to(min_size * aspect, SIZE_STEP), 1333)


def resized_box_sides(stats: DataStats, min_size: int, max_size: int) -> list[float]:
    """Each box's side after its image is resized as torchvision's detection transform does."""
    scales = [
        min(min_size / s, max_size / lo)
        for s, lo in zip(stats.short_sides, stats.long_sides, strict=True)
    ]
    return [side * scales[i] for side, i in zip(stats.box_sides, stats.box_image, strict=True)]


def anchors(stats: DataStats, min_size: int, max_size: int) -> tuple[tuple, tuple]:
    """(sizes, ratios): k-means clusters of the resized boxes' log sides, one more cluster per
    doubling of the 5th-95th percentile range (2 to 5), and of their log height:width ratios
    (at most 3)."""
    sides = resized_box_sides(stats, min_size, max_size)
    q = torch.quantile(
        torch.tensor(sides, dtype=torch.float64), torch.tensor([0.05, 0.95], dtype=torch.float64)
    )
    k = min(5, max(2, math.ceil(math.log2(q[1] / q[0])) + 1))
    sizes = tuple(sorted({max(1, round(s)) for s in log_kmeans(sides, k)}))
    ratios = tuple(sorted({round(r, 2) for r in log_kmeans(stats.box_ratios, 3)}))
    return sizes, ratios


def proposals(stats: DataStats, min_size: int, max_size: int, per_cell: int) -> dict:
    """RoIs per image, their positive share and the RPN's proposal counts."""
    mean = statistics.fmean(stats.objects)
    rois = min(512, max(8, _pow2_at_least(2 * mean)))
    # every object should find room among the positives: 2 per object, a quarter at least
    # (detectron2's) and at most three quarters, so background is always sampled
    positive = round(min(0.75, max(0.25, 2 * mean / rois)), 2)
    aspect = max(lo / sh for lo, sh in zip(stats.long_sides, stats.short_sides, strict=True))
    cells = math.ceil(min_size / 16) * math.ceil(min(min_size * aspect, max_size) / 16)
    pre = min(12000, max(300, int(round(PRE_NMS_SHARE * cells * per_cell, -2))))
    most = max(stats.objects)
    return {
        "rois_per_image": rois,
        "roi_positive_fraction": positive,
        "train_pre_nms": pre,
        "train_proposals": min(2000, pre // 2),
        "test_proposals": min(1000, max(100, int(round(20 * most, -2)))),
    }


@dataclass
class Machine:
    """What the plan fits to: the cores this process may use and the budget."""

    cores: int
    minutes: float  # --max-minutes; 0: no limit
    pretrained: bool = False  # backbone weights given
    # the architecture the weights record ({"name", "kwargs"}), when they do
    weights_model: dict | None = None
    device: str = "cpu"  # the detector trains on the CPU


def data_plan(stats: DataStats, machine: Machine) -> dict:
    """The plan's values that need no timing, by flag name."""
    min_size, max_size = input_size(stats, machine.device)
    sizes, ratios = anchors(stats, min_size, max_size)
    budget = machine.minutes
    warm = not machine.pretrained and budget >= WARM_START_MINUTES
    processes = 1
    if machine.cores > 1 and budget >= PROCESS_MINUTES:
        processes = max(p for p in range(1, min(machine.cores, 4) + 1) if 4 % p == 0)
    backbone, width = "resnet18", 0.25  # the scenes recipe's: fastest from scratch on a CPU
    if machine.pretrained:  # the network the weights were made for
        model = machine.weights_model or {}
        backbone = model.get("name") if model.get("name") in BACKBONES else "resnet18"
        width = model.get("kwargs", {}).get("width", 1.0)
    return {
        "backbone": backbone,
        "width": width,
        "min_size": min_size,
        "max_size": max_size,
        "anchor_sizes": sizes,
        "anchor_ratios": ratios,
        **proposals(stats, min_size, max_size, len(sizes) * len(ratios)),
        "batch_size": 4,
        "lr": PRETRAINED_LR if machine.pretrained else SCRATCH_LR,
        "pretrain_minutes": round(PRETRAIN_SHARE * budget, 1) if warm else 0.0,
        "pretrain_jitter": 0.1 if warm else 0.0,
        "rescore_minutes": round(RESCORE_SHARE * budget, 1) if warm else 0.0,
        "processes": processes,
    }


def fit_schedule(
    minutes: float, warm_minutes: float, step_seconds: float, steps_per_epoch: int
) -> dict:
    """The warm-up and the epochs for the steps that ``minutes`` (less the warm starts')
    allows at ``step_seconds`` a step: the warm-up ``WARMUP_SHARE`` of them (at most
    ``WARMUP_MOST``), and epochs enough for ``EPOCH_ROOM`` times as many steps, so that the
    budget, not the epochs, ends the run and anneals the rate even when the timed step was
    slower than the run's (a busy machine, one process timed for several). Without a budget,
    12 epochs."""
    if minutes <= 0:
        steps = 12 * steps_per_epoch
        return {"epochs": 12, "warmup_iters": min(WARMUP_MOST, round(WARMUP_SHARE * steps))}
    seconds = minutes * 60 * BUDGET_SHARE - warm_minutes * 60
    steps = math.floor(seconds / step_seconds) if seconds > 0 else 0
    if steps < 1:
        raise ReslabError(
            f"--max-minutes {minutes:g}: one training step takes about "
            f"{format_seconds(step_seconds)} here (measured)"
            + (f" and the warm starts {warm_minutes:g} min" if warm_minutes else "")
            + ", which leaves no step; give a larger --max-minutes"
        )
    return {
        "epochs": max(1, math.ceil(EPOCH_ROOM * steps / steps_per_epoch)),
        "warmup_iters": min(WARMUP_MOST, max(1, round(WARMUP_SHARE * steps))),
        "steps_allowed": steps,
    }


def make_plan(
    config: DetectConfig, dataset: CocoDetection, cores: int, measure, weights_model=None
) -> tuple:
    """(``config`` with the plan set, the plan's record): the data's plan, then the schedule
    fitted to the seconds ``measure(config)`` says a step of the planned detector takes.
    Flags in ``config.plan.explicit`` keep the user's values; ``weights_model``: the
    architecture the backbone weights record, if they do."""
    stats = data_stats(dataset)
    pretrained = config.model.weights is not None
    machine = Machine(cores, config.train.max_minutes, pretrained, weights_model)
    values = chosen(config, data_plan(stats, machine))
    config = set_flags(config, values)
    seconds = measure(config)
    per_epoch = max(1, len(dataset) // config.train.batch_size)
    schedule = fit_schedule(machine.minutes, config.warm.minutes, seconds, per_epoch)
    allowed = schedule.pop("steps_allowed", None)
    values.update(chosen(config, schedule))
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}  # as JSON
    record = {
        "recipe": "planned",
        "values": values,
        "explicit": list(config.plan.explicit),
        "data": stats.summary(),
        "machine": {"device": machine.device, "cores": cores, "minutes": machine.minutes},
        "steps_allowed": allowed,
    }
    record["machine"]["step_seconds"] = seconds
    return set_flags(config, values), record


def chosen(config: DetectConfig, planned: dict) -> dict:
    """``planned`` with the flags the user gave replaced by theirs."""
    given = {flag: flag_value(config, flag) for flag in config.plan.explicit}
    return {flag: given.get(flag, value) for flag, value in planned.items() if flag in FLAG_FIELDS}


def warnings_for(dataset: CocoDetection) -> list[str]:
    """One line per category with no box: it is kept in the model, which never learns it."""
    return [
        f"warning: {dataset.annotation_file}: category {c['id']} {c['name']!r} has no boxes; "
        "the detector cannot learn it"
        for c in unused_categories(dataset.coco)
    ]


# where each planned value comes from, as the printed plan says
SOURCES = {
    **dict.fromkeys(("backbone", "width", "batch_size", "lr", "processes"), "machine"),
    **dict.fromkeys(("pretrain_minutes", "pretrain_jitter", "rescore_minutes"), "budget"),
    **dict.fromkeys(("epochs", "warmup_iters"), "timed step"),
}


def plan_table(record: dict):
    """The plan as a rich table: each flag, its value and where it came from."""
    from rich.table import Table

    table = Table(title="the recipe planned from the data and the machine")
    for column in ("flag", "value", "from"):
        table.add_column(column)
    explicit = set(record["explicit"])
    for flag, value in record["values"].items():
        shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        source = "given" if flag in explicit else SOURCES.get(flag, "data")
        table.add_row("--" + flag.replace("_", "-"), shown, source)
    return table


def data_line(record: dict) -> str:
    data, machine = record["data"], record["machine"]
    return (
        f"data: {data['images']} images ({data['empty_images']} empty), shorter side "
        f"{data['image_short_side_median']} px (median), boxes {data['box_side_range'][0]}-"
        f"{data['box_side_range'][1]} px (median {data['box_side_median']}), "
        f"{data['objects_per_image_mean']} objects per image; machine: {machine['cores']} "
        f"cores, a step {format_seconds(machine['step_seconds'])} (measured)"
        + (
            f", {record['steps_allowed']} steps in {machine['minutes']:g} min"
            if record["steps_allowed"]
            else ", no time budget"
        )
    )
