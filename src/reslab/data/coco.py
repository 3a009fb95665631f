"""COCO-format detection data: any user's dataset, and the Fashion-MNIST scenes.

The annotation file is checked whole, when the dataset is opened (:func:`validate`), and every
problem is a line of one ``ReslabError`` that names the file and the offending image or
annotation: a malformed entry, a duplicate id, a missing image file, an unknown category id, a
missing, non-numeric, non-finite, zero-area or outside box, a set of crowd regions only. Boxes travel with their image
through torchvision transforms v2 as ``tv_tensors.BoundingBoxes``, so flips and resizes keep them
right. Category ids map to contiguous labels 1..K in id order (0 is the background).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from reslab.data.folders import check_image_file
from reslab.errors import ReslabError

# a box may poke this many pixels past the border (float rounding in exporters) before it is
# an error; it is then clipped to the image
BORDER_TOLERANCE = 1.0


def train_transforms() -> v2.Transform:
    # horizontal flip is the augmentation detectron2's default C4 schedules use
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(),
        ]
    )


def eval_transforms() -> v2.Transform:
    return v2.ToDtype(torch.float32, scale=True)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ReslabError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ReslabError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ReslabError(f"{path} is not COCO format: needs 'images', 'annotations', 'categories'")
    return data


# problems listed one a line before the rest are only counted
LISTED_PROBLEMS = 5


def validate(data: dict, images_dir: Path, source: Path) -> None:
    """Check a whole COCO dataset up front; every problem found is a line of one
    ``ReslabError`` (the first ``LISTED_PROBLEMS``, then how many more)."""
    problems: list[str] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list) or not all(isinstance(x, dict) for x in data[key]):
            problems.append(f"'{key}' must be a list of objects")
    if not problems:
        categories = _checked_categories(data["categories"], problems)
        images = _checked_images(data["images"], images_dir, problems)
        for ann in data["annotations"]:
            _check_annotation(ann, images, categories, problems)
        problems += _nothing_to_learn(data)
    if len(problems) == 1:
        raise ReslabError(f"{source}: {problems[0]}")
    if problems:
        more = len(problems) - LISTED_PROBLEMS
        lines = problems[:LISTED_PROBLEMS] + ([f"and {more} more"] if more > 0 else [])
        raise ReslabError(f"{source} has {len(problems)} problems:\n  " + "\n  ".join(lines))


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _checked_categories(categories: list[dict], problems: list[str]) -> set[int]:
    """The category ids, each a whole number listed once with a name."""
    ids: set[int] = set()
    for category in categories:
        cid = category.get("id")
        if not _whole(cid) or not isinstance(category.get("name"), str):
            problems.append(f"category {category!r:.60} needs a whole-number 'id' and a 'name'")
        elif cid in ids:
            problems.append(f"category id {cid} is listed twice")
        else:
            ids.add(cid)
    return ids


def _checked_images(images: list[dict], images_dir: Path, problems: list[str]) -> dict:
    """``{id: image}`` of the file's well-formed images, each id and file listed once and
    the file there."""
    found, files = {}, {}
    for image in images:
        iid, name = image.get("id"), image.get("file_name")
        if not _whole(iid) or not isinstance(name, str):
            problems.append(f"image {image!r:.60} needs a whole-number 'id' and a 'file_name'")
            continue
        if not all(_number(image.get(side)) and image[side] > 0 for side in ("width", "height")):
            problems.append(f"image {iid} needs a positive 'width' and 'height'")
        elif iid in found:
            problems.append(f"image id {iid} is listed twice ({found[iid]['file_name']}, {name})")
        elif name in files:
            problems.append(
                f"image {iid} lists {name} again (image {files[name]} has it); list each once"
            )
        elif not _is_file(images_dir / name):
            problems.append(f"image {iid} file {images_dir / name} does not exist")
        else:
            found[iid], files[name] = image, iid
    return found


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        return False


def _check_annotation(ann: dict, images: dict, categories: set, problems: list[str]) -> None:
    where = f"annotation {ann.get('id')!r:.20} (image {ann.get('image_id')!r:.20})"
    image_id, category = ann.get("image_id"), ann.get("category_id")
    box = ann.get("bbox")
    if not _whole(image_id) or image_id not in images:
        problems.append(f"{where} refers to an image id not in 'images'")
    elif not _whole(category) or category not in categories:
        problems.append(
            f"{where} has unknown category id {category!r:.20}; known: {sorted(categories)}"
        )
    elif ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), float):
        problems.append(f"{where} has iscrowd {ann['iscrowd']!r:.20}; COCO's is 0 or 1")
    elif box is None:
        problems.append(f"{where} has no 'bbox'")
    elif not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
        problems.append(f"{where} bbox {box!r:.60} is not four finite numbers (x, y, w, h)")
    else:
        problem = _box_problem(box, images[image_id])
        if problem:
            problems.append(f"{where} {problem}")


def _box_problem(box: list, image: dict) -> str | None:
    x, y, w, h = box
    width, height, t = image["width"], image["height"], BORDER_TOLERANCE
    if w <= 0 or h <= 0:
        return f"has a zero-area box {box} (x, y, w, h)"
    if w > width + t or h > height + t:
        return (
            f"box {box} (x, y, w, h) is larger than its {width}x{height} image; are its sides "
            "swapped or in another scale?"
        )
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"box {box} (x, y, w, h) lies outside its {width}x{height} image"
    return None


def _nothing_to_learn(data: dict) -> list[str]:
    """A set with images but no boxes to learn from: none at all, or crowd regions only."""
    if not data["images"]:
        return []
    if not data["annotations"]:
        return [
            f"{len(data['images'])} images and no annotations at all: a detector learns from "
            "boxes; give the file with its 'annotations'"
        ]
    if all(ann.get("iscrowd", 0) == 1 for ann in data["annotations"]):
        return [
            f"all {len(data['annotations'])} annotations are crowd regions (iscrowd=1), which "
            "training and COCO evaluation both ignore: no object to learn from"
        ]
    return []


def unused_categories(data: dict) -> list[dict]:
    """The categories of a COCO dict that no (non-crowd) box has: a detector never learns them."""
    used = {a["category_id"] for a in data["annotations"] if not a.get("iscrowd", 0)}
    return [c for c in data["categories"] if c["id"] not in used]


def decode_rgb(source: str | Path | bytes, name: str | None = None) -> torch.Tensor:
    """An image file, or its bytes (an upload, called ``name`` in messages), as RGB (3, H, W)
    uint8; a missing or undecodable file is one clear error. A 16-bit PNG decodes to uint16
    and is scaled to uint8, the range the rest expects."""
    if isinstance(source, bytes):
        name, source = name or "the image", torch.frombuffer(bytearray(source), dtype=torch.uint8)
    else:
        check_image_file(source)
        name, source = name or str(source), str(source)
    try:
        image = decode_image(source, mode=ImageReadMode.RGB)
        return v2.functional.to_dtype(image, torch.uint8, scale=True)
    except RuntimeError:
        # torchvision's message names its own source file, not what the user can do
        raise ReslabError(
            f"{name}: not a readable image (PNG, JPEG, WebP or GIF; truncated or another format?)"
        ) from None


class CocoDetection(Dataset):
    """Images and targets ``{"boxes": BoundingBoxes XYXY, "labels", "image_id"}``."""

    def __init__(self, images_dir: str | Path, annotation_file: str | Path, transforms=None):
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        if not self.images_dir.is_dir():
            raise ReslabError(f"image folder {self.images_dir} does not exist")
        self.coco = _read_json(self.annotation_file)
        validate(self.coco, self.images_dir, self.annotation_file)
        self.transforms = transforms
        self.category_ids = sorted(c["id"] for c in self.coco["categories"])
        names = {c["id"]: c["name"] for c in self.coco["categories"]}
        self.class_names = [names[i] for i in self.category_ids]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.images = sorted(self.coco["images"], key=lambda image: image["id"])
        self.annotations: dict[int, list[dict]] = {image["id"]: [] for image in self.images}
        for ann in self.coco["annotations"]:
            # crowd regions are neither positives nor negatives in training (COCO convention)
            if not ann.get("iscrowd", 0):
                self.annotations[ann["image_id"]].append(ann)

    @property
    def image_ids(self) -> list[int]:
        return [image["id"] for image in self.images]

    def held_out(self, fraction: float, seed: int = 0) -> set[int]:
        """The ids of ``fraction`` of the images (at least one, and one left), drawn by
        ``seed`` from the images in id order, so the same file gives the same split."""
        ids = self.image_ids
        if len(ids) < 2:
            raise ReslabError(f"{self.annotation_file} has {len(ids)} image: none to hold out")
        count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        return {ids[i] for i in order[:count].tolist()}

    def subset(self, image_ids) -> CocoDetection:
        """This dataset restricted to ``image_ids``, its COCO dict too (evaluation reads it)."""
        keep = set(image_ids)
        part = copy.copy(self)
        part.coco = {
            **self.coco,
            "images": [i for i in self.coco["images"] if i["id"] in keep],
            "annotations": [a for a in self.coco["annotations"] if a["image_id"] in keep],
        }
        part.images = [image for image in self.images if image["id"] in keep]
        part.annotations = {i: anns for i, anns in self.annotations.items() if i in keep}
        return part

    @property
    def num_classes(self) -> int:
        return len(self.category_ids) + 1  # with the background

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> torch.Tensor:
        return decode_rgb(self.images_dir / self.images[index]["file_name"])

    def __getitem__(self, index: int):
        info = self.images[index]
        image = tv_tensors.Image(self.load_image(index))
        height, width = image.shape[-2:]
        anns = self.annotations[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(
                [self.label_of[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "image_id": info["id"],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def resolve(
    data: str | Path | None, images: str | Path | None, annotations: str | Path | None, split: str
) -> tuple[Path, Path]:
    """(image folder, annotation file) from `--data DIR` or `--images DIR --annotations FILE`."""
    if data is not None:
        if images is not None or annotations is not None:
            raise ReslabError("give either --data DIR or --images DIR --annotations FILE, not both")
        root = Path(data)
        return root / split, root / "annotations" / f"{split}.json"
    if images is None or annotations is None:
        raise ReslabError(
            "needs --data DIR (as `reslab scenes make` writes), or both --images "
            "DIR and --annotations FILE"
        )
    return Path(images), Path(annotations)


def collate(batch):
    return tuple(zip(*batch, strict=True))
