"""Fashion-MNIST (Xiao et al. 2017) held in memory as uint8 tensors.

Where the files are looked for, in order:

1. Debian's ``dataset-fashion-mnist`` package: ``/usr/share/datasets/fashion-mnist/``;
2. ``--data-dir`` (the four IDX files, gzipped or not, directly in it or in
   ``FashionMNIST/raw/`` as torchvision lays them out);
3. a download through torchvision into ``--data-dir`` (needs internet).

Each file is checked against the original release: its decompressed size, its IDX header and
the SHA-256 of its decompressed content (the same whether gzipped by the authors or by Debian).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from reslab.errors import ReslabError

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# (split, kind) -> (file stem, decompressed bytes, SHA-256 of the decompressed bytes)
FILES = {
    ("train", "images"): (
        "train-images-idx3-ubyte",
        47_040_016,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    ("train", "labels"): (
        "train-labels-idx1-ubyte",
        60_008,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    ("test", "images"): (
        "t10k-images-idx3-ubyte",
        7_840_016,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    ("test", "labels"): (
        "t10k-labels-idx1-ubyte",
        10_008,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}
SPLITS = ("train", "test")


@dataclass
class Split:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64
    source: Path  # the folder the files came from
    classes: tuple[str, ...] = CLASSES

    def __len__(self) -> int:
        return len(self.labels)


def _find_file(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (sub / name).is_file():
                return sub / name
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ReslabError(f"cannot read {path}: {error}") from None


def parse_idx(data: bytes, path: Path | str = "<bytes>") -> torch.Tensor:
    """Decode an IDX file of unsigned bytes (magic 0x0000 0x08 ndim, then big-endian sizes)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ReslabError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for size in shape:
        count *= size
    if len(data) != header + count:
        raise ReslabError(
            f"{path} is truncated or padded: its header says {shape} ({header + count} bytes), "
            f"the file has {len(data)}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _verified(folder: Path, split: str, kind: str, check_hash: bool) -> torch.Tensor:
    stem, size, digest = FILES[(split, kind)]
    path = _find_file(folder, stem)
    if path is None:
        raise FileNotFoundError(stem)
    data = _read_bytes(path)
    if len(data) != size:
        raise ReslabError(
            f"{path} has {len(data):,} bytes decompressed; the original Fashion-MNIST file has "
            f"{size:,}. Remove it, or reinstall with `apt-get install --reinstall "
            "dataset-fashion-mnist`"
        )
    if check_hash and hashlib.sha256(data).hexdigest() != digest:
        raise ReslabError(f"{path} has the right size but not the original release's content")
    return parse_idx(data, path)


def _has_all(folder: Path) -> bool:
    return all(_find_file(folder, stem) for stem, _, _ in FILES.values())


def locate(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """The folder holding all four files; see the module docstring for the order."""
    candidates = [SYSTEM_DIR]
    if data_dir is not None:
        candidates.append(Path(data_dir))
    for folder in candidates:
        if _has_all(folder):
            return folder
    if data_dir is not None and download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(data_dir), train=True, download=True)
            FashionMNIST(str(data_dir), train=False, download=True)
        except Exception as error:  # network errors come in many types
            download_error = f"download failed ({type(error).__name__}: {error})"
        else:
            if _has_all(Path(data_dir)):
                return Path(data_dir)
            download_error = "download finished but the files are not where expected"
    else:
        download_error = "no download tried (needs --data-dir)" if download else "download off"
    raise ReslabError(
        "Fashion-MNIST not found. Any of these works: (1) `apt-get install "
        f"dataset-fashion-mnist` (puts the files in {SYSTEM_DIR}); (2) --data-dir DIR with the "
        "four IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); (3) --data-dir DIR on a "
        f"machine with internet, to download through torchvision. Looked in: "
        f"{', '.join(str(c) for c in candidates)}; {download_error}"
    )


def load(
    split: str,
    data_dir: str | Path | None = None,
    download: bool = True,
    check_hash: bool = True,
) -> Split:
    """One split as tensors.

    ``check_hash=False`` accepts any well-formed IDX files, of any size: tests write small
    synthetic sets with :func:`write_idx` and point ``SYSTEM_DIR`` elsewhere.
    """
    if split not in SPLITS:
        raise ReslabError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder = locate(data_dir, download)
    if check_hash:
        images = _verified(folder, split, "images", True)
        labels = _verified(folder, split, "labels", True)
    else:
        paths = [_find_file(folder, FILES[(split, kind)][0]) for kind in ("images", "labels")]
        images, labels = (parse_idx(_read_bytes(path), path) for path in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ReslabError(
            f"{folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not "
            "pair up (expected (N, 28, 28) and (N,))"
        )
    return Split(images, labels.long(), folder)


def write_idx(path: str | Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzipped if ``path`` ends in .gz); used by tests."""
    array = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    data = header + array.numpy().tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
