"""COCO evaluation of known detections, with category ids that are not 1..K: a perfect detector
scores 1, and a result naming the detector's internal label or carrying an xyxy box does not."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torchvision.io import write_png

from reslab.data.coco import CocoDetection, eval_transforms
from reslab.engine.coco_eval import coco_evaluate
from reslab.engine.detect_infer import predict_dataset

CATEGORY_IDS = (3, 7, 12)  # the dataset's ids, in the order of the detector's labels 1, 2, 3
IMAGE_IDS = (101, 205, 309, 412)
SIZE = 64
# per image, (class index, x, y, w, h): class k is painted in colour channel k alone; every box
# is away from the origin and narrower than its x, so an xyxy box read as xywh misses it
OBJECTS = (
    ((0, 20, 12, 10, 22), (1, 40, 30, 14, 8)),
    ((2, 12, 40, 9, 9), (0, 35, 8, 16, 12)),
    ((1, 24, 24, 12, 20),),
    ((0, 10, 10, 8, 8), (1, 30, 14, 10, 16), (2, 44, 40, 12, 12)),
)


def ground_truth() -> dict:
    images, annotations = [], []
    for image_id, objects in zip(IMAGE_IDS, OBJECTS, strict=True):
        images.append(
            {"id": image_id, "file_name": f"{image_id}.png", "width": SIZE, "height": SIZE}
        )
        for k, x, y, w, h in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[k],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def perfect_results(truth: dict) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in truth["annotations"]
    ]


def test_perfect_detections_score_one_and_wrong_ids_or_boxes_do_not():
    truth = ground_truth()
    metrics = coco_evaluate(truth, perfect_results(truth))
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["per_class"] == pytest.approx({f"class{c}": 1.0 for c in CATEGORY_IDS})
    assert metrics["label_accuracy"] == 1.0 and metrics["found"] == len(truth["annotations"])
    # the controls: the same boxes under swapped ids, and the same boxes as xyxy
    swap = {3: 7, 7: 3, 12: 12}
    swapped = [{**r, "category_id": swap[r["category_id"]]} for r in perfect_results(truth)]
    assert coco_evaluate(truth, swapped)["mAP"] < 0.5
    xyxy = [
        {**r, "bbox": [x, y, x + w, y + h]}
        for r in perfect_results(truth)
        for x, y, w, h in [r["bbox"]]
    ]
    assert coco_evaluate(truth, xyxy)["mAP"] < 0.1


class PerfectDetector(nn.Module):
    """Stands in for a detector: finds each colour's painted box in the image and returns it
    as torchvision detectors do, xyxy with the internal label (channel k -> label k + 1)."""

    def forward(self, images):
        outputs = []
        for image in images:  # (3, H, W) in [0, 1]
            boxes, labels = [], []
            for k in range(3):
                others = [c for c in range(3) if c != k]
                mask = (image[k] > 0.5) & (image[others] < 0.5).all(0)
                if mask.any():
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    labels.append(k + 1)
            outputs.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "scores": torch.full((len(labels),), 0.9),
                }
            )
        return outputs


def write_dataset(root) -> CocoDetection:
    truth = ground_truth()
    for image_id, objects in zip(IMAGE_IDS, OBJECTS, strict=True):
        pixels = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
        for k, x, y, w, h in objects:
            pixels[k, y : y + h, x : x + w] = 255
        write_png(pixels, str(root / f"{image_id}.png"))
    (root / "ann.json").write_text(json.dumps(truth))
    return CocoDetection(root, root / "ann.json", transforms=eval_transforms())


def test_predict_dataset_gives_the_datasets_category_ids_and_xywh_boxes(tmp_path):
    dataset = write_dataset(tmp_path)
    results = predict_dataset(PerfectDetector(), dataset, batch_size=3)
    assert {r["category_id"] for r in results} == set(CATEGORY_IDS)
    assert {r["image_id"] for r in results} == set(IMAGE_IDS)
    assert sorted((r["image_id"], r["category_id"], r["bbox"]) for r in results) == sorted(
        (r["image_id"], r["category_id"], r["bbox"]) for r in perfect_results(dataset.coco)
    )
    metrics = coco_evaluate(dataset.coco, results)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP75"] == pytest.approx(1.0)
