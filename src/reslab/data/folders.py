"""Image folders in torchvision's ImageFolder layout, decoded per sample in DataLoader workers.

``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (or ``valid/``, ``validation/``,
``test/`` for the held-out split); or ``root/<class>/*.png`` split by a fraction drawn from the
seed. Every image is converted to RGB and resized to a square side (or, with ``resize``, its
centre crop taken as for ImageNet weights), so batches stack into uint8 tensors and the rest of
the pipeline is the one Fashion-MNIST uses.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.Image import DecompressionBombError
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from reslab.data.sources import Batch, train_order
from reslab.errors import ReslabError

# what PIL raises for a file it cannot read: corrupt, truncated or not an image, or one that
# declares more pixels than PIL's MAX_IMAGE_PIXELS (a decompression bomb: a few bytes on disk,
# gigabytes once decoded)
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, DecompressionBombError)

# ImageNet statistics: the usual choice for photographs, and what pretrained weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 64
# what the held-out split beside train/ may be called, in the order they are looked for
HELD_OUT = ("val", "valid", "validation", "test")
HELD_OUT_NAMES = ", ".join(f"{name}/" for name in HELD_OUT)  # for messages


def held_out_folder(root: Path) -> Path | None:
    """root/val, or the first of the other names for a held-out split that is a folder."""
    return next((root / name for name in HELD_OUT if (root / name).is_dir()), None)


def check_image_file(path: str | Path) -> None:
    """A path given as an image must be a file: say so for a folder or a missing path."""
    path = Path(path)
    if path.is_dir():
        raise ReslabError(f"{path} is a folder; give the image files in it (e.g. {path}/*.png)")
    if not path.is_file():
        raise ReslabError(f"image {path} does not exist")


def to_8bit(image: Image.Image, path: str | Path) -> Image.Image:
    """16-bit grayscale (PNG, TIFF: PIL's modes I;16* and I) scaled to 8 bits; PIL's convert
    would clip every value above 255, turning the image white. Float images have no fixed
    range to scale from and are refused."""
    if image.mode == "F":
        raise ReslabError(
            f"{path}: a 32-bit float image has no fixed range to read it in; save it as an 8- "
            "or 16-bit PNG"
        )
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image, dtype=np.float64).clip(0, 65535)
    return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), "L")


def centre_crop(image: Image.Image, size: int, resize: int) -> Image.Image:
    """The shorter side resized to ``resize``, then the central ``size`` x ``size`` square:
    torchvision's ``Resize(resize)`` then ``CenterCrop(size)``, the evaluation transform that
    ImageNet weights were scored with."""
    width, height = image.size
    scale = resize / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = round((width - size) / 2), round((height - size) / 2)
    return image.crop((left, top, left + size, top + size))


def open_image(
    source: str | Path | bytes,
    channels: int,
    size: int,
    name: str | None = None,
    resize: int = 0,
) -> torch.Tensor:
    """Any PNG/JPEG (any size or mode) -> uint8 (channels, size, size), as training saw it:
    the whole image squashed to the square, or with ``resize`` its :func:`centre_crop`.
    ``source`` is a file's path or its bytes (an upload); ``name`` stands for it in messages.
    A photo's EXIF orientation is applied, so the image is upright as viewers show it."""
    if isinstance(source, bytes):
        name, source = name or "the image", io.BytesIO(source)
    else:
        check_image_file(source)
        name = name or str(source)
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image)
            image = to_8bit(image, name).convert("L" if channels == 1 else "RGB")
            if resize:
                image = centre_crop(image, size, resize)
            else:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except UNREADABLE as e:
        raise ReslabError(f"{name}: not a readable image ({type(e).__name__})") from None
    return data.view(size, size, channels).permute(2, 0, 1).contiguous()


def readable(path: Path) -> bool:
    """Whether PIL can parse the file's header and structure (no full decode: cheap)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except UNREADABLE:
        return False
    return True


def scan(
    root: Path, strict: bool = False, skipped: list[Path] | None = None
) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(file, class index) pairs of one ImageFolder tree; empty trees and classes are errors.

    Unreadable files (corrupt, truncated, not images) are left out and appended to
    ``skipped``; with ``strict`` the first one stops the scan with its name.
    """
    if not root.is_dir():
        raise ReslabError(f"image folder {root} does not exist")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if not classes:
        raise ReslabError(
            f"{root} has no class folders; expected {root}/<class>/<image> "
            "(or train/ and val/ each laid out so)"
        )
    if len(classes) == 1:
        raise ReslabError(
            f"{root} has one class folder ({classes[0]}); a classifier needs two or more"
        )
    samples = []
    for index, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        )
        bad = [p for p in files if not readable(p)]
        if bad and strict:
            raise ReslabError(f"{bad[0]}: not a readable image (--strict stops on the first)")
        if skipped is not None:
            skipped.extend(bad)
        files = [p for p in files if p not in bad]
        if not files:
            raise ReslabError(
                f"class folder {root / name} has no images ({', '.join(IMG_EXTENSIONS)})"
            )
        samples.extend((p, index) for p in files)
    return samples, classes


def check_not_split(root: Path, held_out: Path | None) -> None:
    """A root without both train/ and a held-out folder is split by fraction, its folders
    being the classes: a lone train/ or val/ there would become a class, and the model would
    learn which split an image came from. Stop before that, naming the layout that works."""
    if (root / "train").is_dir():
        raise ReslabError(
            f"{root}/train has no held-out folder beside it ({HELD_OUT_NAMES}): add one "
            f"with the same class folders, or give --data {root}/train to hold out "
            "--val-fraction of it"
        )
    if held_out is not None:
        raise ReslabError(
            f"{held_out} has no train/ beside it; expected {root}/train/<class>/<image> and "
            f"{held_out}/<class>/<image>"
        )


class FolderDataset(Dataset):
    """uint8 RGB images of ``size`` (see :func:`open_image` for ``resize``) and labels."""

    def __init__(self, samples: list[tuple[Path, int]], size: int, resize: int = 0):
        self.samples = samples
        self.size, self.resize = size, resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return open_image(path, 3, self.size, resize=self.resize), label


class FolderSource:
    """Train and validation splits of an image folder, as uint8 RGB batches of ``size``.

    With ``resize`` the validation images are centre crops (:func:`centre_crop`); the
    training images are too, unless ``whole_train``: then they are whole images squashed to
    ``resize`` square, for a random resized crop to cut its windows from."""

    channels = 3
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(
        self,
        root: str | Path,
        size: int = DEFAULT_SIZE,
        val_fraction: float = 0.1,
        seed: int = 0,
        workers: int = 2,
        strict: bool = False,
        resize: int = 0,
        whole_train: bool = False,
    ):
        root = Path(root)
        self.skipped: list[Path] = []
        held_out = held_out_folder(root)
        if (root / "train").is_dir() and held_out is not None:
            train, self.classes = scan(root / "train", strict, self.skipped)
            val, val_classes = scan(held_out, strict, self.skipped)
            if val_classes != self.classes:
                raise ReslabError(
                    f"{root}/train and {held_out} have different class folders: "
                    f"{list(self.classes)} vs {list(val_classes)}"
                )
            how = f"train/ and {held_out.name}/"
        else:
            check_not_split(root, held_out)
            samples, self.classes = scan(root, strict, self.skipped)
            perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
            n_val = max(1, round(val_fraction * len(samples)))
            if n_val >= len(samples):
                raise ReslabError(f"{root} has {len(samples)} images: too few to split")
            val = [samples[i] for i in perm[:n_val].tolist()]
            train = [samples[i] for i in perm[n_val:].tolist()]
            how = f"a {val_fraction:g} validation split (seed {seed})"
        self.size, self.resize = size, resize
        self.workers = workers
        whole = resize and whole_train
        self.train = (
            FolderDataset(train, resize, 0) if whole else FolderDataset(train, size, resize)
        )
        self.val = FolderDataset(val, size, resize)
        self.train_size, self.test_size = len(train), len(val)
        self.description = (
            f"image folder {root} ({len(self.classes)} classes, {len(train):,} train and "
            f"{len(val):,} validation images from {how}, decoded by {workers} workers)"
        )
        if self.skipped:
            self.description += (
                f"\nwarning: skipped {len(self.skipped)} unreadable file(s), e.g. "
                f"{self.skipped[0]}; --strict stops on them instead"
            )

    def _batches(self, dataset: Dataset, batches: list) -> Iterator[Batch]:
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.workers)
        try:
            for images, labels in loader:
                yield images, labels.long()
        except ReslabError as error:
            # a worker's error arrives wrapped in a traceback; keep its last line, the message
            last = str(error).strip().splitlines()[-1]
            raise ReslabError(last.removeprefix("reslab.errors.ReslabError: ")) from None

    def train_batches(
        self, batch_size: int, generator: torch.Generator | None, drop_last: bool = True
    ) -> Iterator[Batch]:
        batches = train_order(self.train_size, batch_size, generator, drop_last)
        order = [b.tolist() for b in batches]
        yield from self._batches(self.train, order)

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        index = list(range(self.test_size))
        yield from self._batches(
            self.val, [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
        )
