"""COCO-format detection data: any user's dataset, and the Fashion-MNIST scenes.

The annotation file is checked once, when the dataset is opened, and every problem is a one-line
``ReslabError`` that names the file and the offending image or annotation: a missing image file,
an unknown category id, a zero-area box, a box outside its image. Boxes travel with their image
through torchvision transforms v2 as ``tv_tensors.BoundingBoxes``, so flips and resizes keep them
right. Category ids map to contiguous labels 1..K in id order (0 is the background).
"""

from __future__ import annotations

import copy
import json
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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReslabError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ReslabError(f"{path} is not COCO format: needs 'images', 'annotations', 'categories'")
    return data


def validate(data: dict, images_dir: Path, source: Path) -> None:
    """Raise a one-line ``ReslabError`` on the first thing wrong with a COCO dataset."""
    categories = {c["id"] for c in data["categories"]}
    images = _checked_images(data, images_dir, source)
    if data["images"] and not data["annotations"]:
        raise ReslabError(
            f"{source} has {len(data['images'])} images and no annotations at all: a detector "
            "learns from boxes; give the file with its 'annotations'"
        )
    for ann in data["annotations"]:
        where = f"{source}: annotation {ann.get('id')} (image {ann.get('image_id')})"
        if ann.get("image_id") not in images:
            raise ReslabError(f"{where} refers to an image id not in 'images'")
        if ann.get("category_id") not in categories:
            raise ReslabError(
                f"{where} has unknown category id {ann.get('category_id')}; "
                f"known: {sorted(categories)}"
            )
        _check_box(ann, images[ann["image_id"]], where)


def _checked_images(data: dict, images_dir: Path, source: Path) -> dict:
    """``{id: image}`` of the file's images, each file there and listed once."""
    images, files = {}, {}
    for image in data["images"]:
        path = images_dir / image["file_name"]
        if image["file_name"] in files:
            raise ReslabError(
                f"{source}: image {image['id']} lists {image['file_name']} again (image "
                f"{files[image['file_name']]} has it); list each image once"
            )
        if not path.is_file():
            raise ReslabError(f"{source}: image {image['id']} file {path} does not exist")
        images[image["id"]] = image
        files[image["file_name"]] = image["id"]
    return images


def _check_box(ann: dict, image: dict, where: str) -> None:
    x, y, w, h = ann["bbox"]
    if w <= 0 or h <= 0:
        raise ReslabError(f"{where} has a zero-area box {ann['bbox']} (x, y, w, h)")
    t = BORDER_TOLERANCE
    if w > image["width"] + t or h > image["height"] + t:
        raise ReslabError(
            f"{where} box {ann['bbox']} (x, y, w, h) is larger than its "
            f"{image['width']}x{image['height']} image; are its sides swapped or in another scale?"
        )
    if x < -t or y < -t or x + w > image["width"] + t or y + h > image["height"] + t:
        raise ReslabError(
            f"{where} box {ann['bbox']} (x, y, w, h) lies outside its "
            f"{image['width']}x{image['height']} image"
        )


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
