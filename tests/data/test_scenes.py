"""Fashion-MNIST scenes: determinism, box correctness, COCO layout."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import decode_image

from reslab.cli import main
from reslab.data import fashion_mnist
from reslab.data.scenes import BACKGROUND, SceneConfig, make_scenes, render_scene

SMALL = SceneConfig(images=5, size=64, seed=3)


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_and_other_seed_differs(tmp_path):
    make_scenes(tmp_path / "a", SMALL)
    make_scenes(tmp_path / "b", SMALL)
    make_scenes(tmp_path / "c", SceneConfig(images=5, size=64, seed=4))
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert set(a) == set(c) and a != c
    assert len([p for p in a if p.parts[0] == "train"]) == 5
    assert len([p for p in a if p.parts[0] == "val"]) == 1


def test_annotations_are_coco_and_boxes_hold_the_items(tmp_path):
    paths = make_scenes(tmp_path, SceneConfig(images=6, size=64, seed=1))
    data = json.loads(paths["train"].read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    assert data["annotations"]
    for image in data["images"]:
        pixels = decode_image(str(tmp_path / "train" / image["file_name"]))[0]
        assert pixels.shape == (64, 64)
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert 1 <= len(anns) <= 6
        covered = torch.zeros_like(pixels, dtype=torch.bool)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
            assert ann["area"] == w * h and 1 <= ann["category_id"] <= 10
            covered[y : y + h, x : x + w] = True
        # every item pixel lies in some box
        assert not ((pixels > BACKGROUND) & ~covered).any()


def test_a_single_item_box_is_tight():
    split = fashion_mnist.load("test")
    config = SceneConfig(size=96, min_items=1, max_items=1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        canvas, objects = render_scene(split.images, split.labels, config, generator)
        (((x0, y0, x1, y1), label),) = objects
        ys, xs = torch.nonzero(canvas > BACKGROUND, as_tuple=True)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert 0 <= label <= 9


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--images", "0"], "--images must be at least 1, got 0"),
        (["--size", "8"], "--size must be at least 32 pixels, got 8"),
        (["--max-items", "0"], "--max-items must be at least 1 (the fewest items per canvas)"),
    ],
)
def test_bad_scene_flags_name_the_flag_and_value(flags, message, tmp_path, capsys):
    assert main(["scenes", "make", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reslab: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing written
