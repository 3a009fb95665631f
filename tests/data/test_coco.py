"""COCO-format loader: targets, label mapping, transforms that keep boxes, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import write_png
from torchvision.transforms import v2

from reslab.data.coco import CocoDetection, decode_rgb, eval_transforms, resolve
from reslab.errors import ReslabError


def write_dataset(root, annotations=None, images=None):
    """Two 40x30 images; categories with ids 5 and 9 (not contiguous)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    images = images or [
        {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 3, "file_name": "b.png", "width": 40, "height": 30},
    ]
    for image in images:
        pixels = torch.zeros(3, image["height"], image["width"], dtype=torch.uint8)
        write_png(pixels, str(root / "img" / image["file_name"]))
    annotations = (
        annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [20, 10, 15, 20]},
            {"id": 3, "image_id": 3, "category_id": 5, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        ]
    )
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return root / "img", path


def test_targets_in_xyxy_with_contiguous_labels(tmp_path):
    dataset = CocoDetection(*write_dataset(tmp_path), transforms=eval_transforms())
    assert len(dataset) == 2 and dataset.num_classes == 3
    assert dataset.class_names == ["five", "nine"]  # in category id order
    image, target = dataset[1]  # image id 7 (sorted by id)
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [20, 10, 35, 30]]
    assert target["labels"].tolist() == [2, 1]
    assert target["image_id"] == 7
    _, crowd_only = dataset[0]  # crowd regions are not training targets
    assert crowd_only["boxes"].shape == (0, 4)


def test_flip_moves_the_boxes_with_the_image(tmp_path):
    flip = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)])
    _, target = CocoDetection(*write_dataset(tmp_path), transforms=flip)[1]
    assert target["boxes"].tolist() == [[28, 3, 38, 8], [5, 10, 20, 30]]


@pytest.mark.parametrize(
    "annotation, message",
    [
        ({"bbox": [30, 5, 20, 5], "category_id": 5}, "outside its 40x30 image"),
        ({"bbox": [3, 5, 0, 5], "category_id": 5}, "zero-area box"),
        ({"bbox": [3, 5, 4, 5], "category_id": 6}, "unknown category id 6"),
    ],
)
def test_bad_annotations_are_one_line_errors(tmp_path, annotation, message):
    images, path = write_dataset(tmp_path, [{"id": 11, "image_id": 7, **annotation}])
    with pytest.raises(ReslabError, match=message) as error:
        CocoDetection(images, path)
    assert "annotation 11" in str(error.value) and "\n" not in str(error.value)


def test_missing_image_file_is_named(tmp_path):
    images, path = write_dataset(tmp_path)
    (images / "b.png").unlink()
    with pytest.raises(ReslabError, match=r"image 3 file .*b\.png does not exist"):
        CocoDetection(images, path)


def test_resolve_data_folder_and_explicit_paths(tmp_path):
    assert resolve(tmp_path, None, None, "val") == (
        tmp_path / "val",
        tmp_path / "annotations" / "val.json",
    )
    assert resolve(None, "i", "a.json", "train") == (
        tmp_path.__class__("i"),
        tmp_path.__class__("a.json"),
    )
    with pytest.raises(ReslabError, match="needs --data"):
        resolve(None, "i", None, "train")


def test_decode_rgb_says_what_is_wrong_with_an_image_file(tmp_path):
    write_png(torch.full((1, 5, 7), 9, dtype=torch.uint8), str(tmp_path / "gray.png"))
    image = decode_rgb(tmp_path / "gray.png")
    assert image.shape == (3, 5, 7) and image.dtype == torch.uint8 and int(image.max()) == 9
    with pytest.raises(ReslabError, match=r"image .*missing\.png does not exist"):
        decode_rgb(tmp_path / "missing.png")
    with pytest.raises(ReslabError, match=r"is a folder; give the image files in it"):
        decode_rgb(tmp_path)
    (tmp_path / "notes.png").write_text("not pixels")
    with pytest.raises(ReslabError, match=r"notes\.png: not a readable image") as info:
        decode_rgb(tmp_path / "notes.png")
    assert "csrc" not in str(info.value)  # not torchvision's own source path


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    # a gradient saved in 16 bits and in 8 bits: both decode to the same uint8 image
    levels = torch.arange(256, dtype=torch.int32).view(1, 16, 16)
    Image.fromarray((levels[0] * 257).numpy().astype("uint16")).save(tmp_path / "deep.png")
    write_png(levels.to(torch.uint8), str(tmp_path / "flat.png"))
    deep, flat = decode_rgb(tmp_path / "deep.png"), decode_rgb(tmp_path / "flat.png")
    assert deep.dtype == torch.uint8 and torch.equal(deep, flat)


def image(iid, name="a.png"):
    return {"id": iid, "file_name": name, "width": 40, "height": 30}


def box(aid, bbox="absent", **extra):
    ann = {"id": aid, "image_id": 7, "category_id": 9, **extra}
    return ann if bbox == "absent" else {**ann, "bbox": bbox}


@pytest.mark.parametrize(
    "annotations, images, message",
    [
        ([box(1)], None, "annotation 1 (image 7) has no 'bbox'"),
        ([box(1, ["1", "2", "3", "4"])], None, "is not four finite numbers"),
        ([box(1, [1, 2, float("nan"), 4])], None, "is not four finite numbers"),
        ([box(1, [1, 2, 3, 4])], [image(7), image(7, "b.png")], "image id 7 is listed twice"),
        ([box(1, [1, 2, 3, 4], iscrowd=1)], None, "crowd regions (iscrowd=1)"),
    ],
)
def test_coco_hostile_files_name_the_problem(tmp_path, annotations, images, message):
    with pytest.raises(ReslabError) as error:
        CocoDetection(*write_dataset(tmp_path, annotations, images))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_coco_problems_are_all_listed_up_front_a_few_then_a_count(tmp_path):
    annotations = [box(i, [1, 2, 0, 4]) for i in range(1, 9)]  # eight zero-area boxes
    with pytest.raises(ReslabError) as error:
        CocoDetection(*write_dataset(tmp_path, annotations))
    lines = str(error.value).splitlines()
    assert lines[0].endswith("ann.json has 8 problems:") and lines[-1] == "  and 3 more"
    assert [line.startswith("  annotation ") for line in lines[1:-1]] == [True] * 5
