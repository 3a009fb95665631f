"""COCO box AP through pycocotools, the finding-against-naming breakdown beside it, and the
table and line that report them."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.console import Console
from rich.table import Table
from torchvision.ops import box_convert, box_iou, nms


def _cocoeval(ground_truth: dict, results: Sequence[dict]) -> COCOeval | None:
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        for ann in gt.dataset["annotations"]:  # optional in a user's file, read by COCOeval
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(list(results)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_evaluate(ground_truth: dict, results: Sequence[dict]) -> dict:
    """COCO box AP through pycocotools ``COCOeval``: mAP@[.5:.95], mAP@.5 and AP per class,
    with :func:`error_breakdown`'s keys beside them."""
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    evaluator = _cocoeval(ground_truth, results)
    if evaluator is None:
        metrics = {
            "mAP": 0.0,
            "mAP50": 0.0,
            "mAP75": 0.0,
            "per_class": dict.fromkeys(names.values(), 0.0),
        }
    else:
        # precision: (IoU thresholds, recall points, categories, area ranges, max detections)
        precision = evaluator.eval["precision"]
        per_class = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[names[category_id]] = float(np.mean(p)) if p.size else float("nan")
        stats = evaluator.stats
        metrics = {
            "mAP": float(stats[0]),
            "mAP50": float(stats[1]),
            "mAP75": float(stats[2]),
            "per_class": per_class,
        }
    return {**metrics, "detections": len(results), **error_breakdown(ground_truth, results)}


def _xyxy(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")


def error_breakdown(ground_truth: dict, results: Sequence[dict]) -> dict:
    """Whether a detector's misses come from finding the objects or from naming them.

    - ``class_agnostic_mAP50``: AP@.5 with every box and object of one class, after NMS at
      IoU 0.5 across classes in each image (an object boxed under two labels counts once);
    - ``label_accuracy``: of the objects some detection overlaps at IoU >= 0.5, the share whose
      highest-scoring such detection has the right label; ``found``, ``objects``;
    - ``confusion``: true class -> predicted class -> objects, wrong labels only.
    """
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    objects: dict[int, list[dict]] = {}
    for ann in ground_truth["annotations"]:
        if not ann.get("iscrowd", 0):
            objects.setdefault(ann["image_id"], []).append(ann)
    detections: dict[int, list[dict]] = {}
    for det in results:
        detections.setdefault(det["image_id"], []).append(det)
    kept, found, right = [], 0, 0
    confusion: dict[str, dict[str, int]] = {}
    for image_id, dets in detections.items():
        boxes = _xyxy([d["bbox"] for d in dets])
        scores = torch.tensor([d["score"] for d in dets], dtype=torch.float32)
        kept += [{**dets[k], "category_id": 1} for k in nms(boxes, scores, 0.5).tolist()]
        anns = objects.get(image_id, [])
        if not anns:
            continue
        overlaps = box_iou(_xyxy([a["bbox"] for a in anns]), boxes) >= 0.5
        for ann, hits in zip(anns, overlaps, strict=True):
            if not hits.any():
                continue
            found += 1
            best = dets[int(torch.where(hits, scores, -1.0).argmax())]
            if best["category_id"] == ann["category_id"]:
                right += 1
            else:
                row = confusion.setdefault(names[ann["category_id"]], {})
                label = names[best["category_id"]]
                row[label] = row.get(label, 0) + 1
    one_class = {
        "images": ground_truth["images"],
        "annotations": [{**a, "category_id": 1} for a in ground_truth["annotations"]],
        "categories": [{"id": 1, "name": "object"}],
    }
    evaluator = _cocoeval(one_class, kept)
    return {
        "class_agnostic_mAP50": 0.0 if evaluator is None else float(evaluator.stats[1]),
        "objects": sum(len(anns) for anns in objects.values()),
        "found": found,
        "label_accuracy": right / found if found else 0.0,
        "confusion": confusion,
    }


def report_metrics(console: Console, metrics: dict, title: str) -> None:
    table = Table(title=f"COCO box AP ({title}, {metrics['detections']} detections)")
    table.add_column("class")
    table.add_column("AP@[.5:.95]", justify="right")
    for name, ap in metrics["per_class"].items():
        table.add_row(name, f"{ap:.3f}")
    table.add_section()
    table.add_row("mAP@[.5:.95]", f"{metrics['mAP']:.3f}")
    table.add_row("mAP@.5", f"{metrics['mAP50']:.3f}")
    console.print(table)
    console.print(errors_line(metrics), soft_wrap=True)


def errors_line(metrics: dict, top: int = 3) -> str:
    """Finding against naming, from :func:`error_breakdown`'s keys, in one line."""
    pairs = sorted(
        (
            (count, truth, label)
            for truth, row in metrics["confusion"].items()
            for label, count in row.items()
        ),
        key=lambda pair: -pair[0],
    )
    line = (
        f"class-agnostic mAP@.5 {metrics['class_agnostic_mAP50']:.3f}: "
        f"{metrics['found']:,} of {metrics['objects']:,} objects found at IoU 0.5, "
        f"{metrics['label_accuracy']:.1%} of them with the right label"
    )
    if pairs:
        line += "; most confused: " + ", ".join(
            f"{truth} as {label} {count}" for count, truth, label in pairs[:top]
        )
    return line
