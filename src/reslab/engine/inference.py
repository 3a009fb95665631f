"""Using a trained checkpoint: evaluate it on a data set, classify image files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from reslab import fast
from reslab.data.folders import (
    HELD_OUT_NAMES,
    FolderDataset,
    check_image_file,
    held_out_folder,
    open_image,
    scan,
)
from reslab.data.transforms import InputSpec
from reslab.engine.checkpoint import model_from_checkpoint, require_classifier
from reslab.engine.config import TrainConfig
from reslab.engine.evaluate import Evaluation, evaluate, logits
from reslab.engine.state import open_source
from reslab.errors import ReslabError, check_whole


def _setup(
    payload: dict, precision: str, compile: bool, shift: int | None = None, fast_path: bool = True
) -> tuple[torch.nn.Module, TrainConfig, InputSpec]:
    """The checkpoint's model on the inference fast path (batch norm folded, channels_last,
    ``precision``: fp32, bf16, or auto = bf16 where the CPU has it), its config and input;
    ``shift`` replaces the config's ``tta_shift`` when given. ``fast_path=False`` keeps the
    plain eval-mode model in fp32 and NCHW, the baseline the fast path is measured against."""
    require_classifier(payload)
    for key in ("config", "input", "classes"):
        if key not in payload:
            raise ReslabError(f"the checkpoint has no {key!r}; it was not written by reslab train")
    model = model_from_checkpoint(payload)
    config = TrainConfig.from_dict(payload["config"])
    if shift is not None:
        check_whole("tta-shift", shift, least=0)
        config = replace(config, tta_shift=shift)
    if fast_path:
        model = fast.prepare_for_inference(model, precision, fold_bn=True, compile=compile)
    else:
        model = fast.prepare_for_inference(model, "fp32", fold_bn=False, channels_last=False)
    return model, config, InputSpec.from_dict(payload["input"])


class Classifier:
    """A checkpoint's classifier ready to predict: the model on the inference fast path, the
    input spec it was trained with and its test-time views. `reslab predict` and `reslab serve`
    both classify through it, so a file and an upload become the same input."""

    def __init__(
        self,
        payload: dict,
        precision: str = "auto",
        compile: bool = False,
        shift: int | None = None,
        fast_path: bool = True,
    ):
        self.model, self.config, self.spec = _setup(payload, precision, compile, shift, fast_path)
        self.classes: list[str] = list(payload["classes"])

    def read(self, source: str | Path | bytes, name: str | None = None) -> torch.Tensor:
        """An image file or its bytes as uint8 (C, S, S), converted as training read images."""
        return open_image(source, self.spec.channels, self.spec.source_size, name)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, S, S) -> (N, K) class probabilities, averaged over the test views."""
        out = logits(
            self.model, images, self.spec, tta=self.config.tta, shift=self.config.tta_shift
        )
        return out.softmax(1)

    def top(self, images: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable (class, probability) pairs of each image, best first."""
        top = self.probabilities(images).topk(min(k, len(self.classes)), dim=1)
        return [
            [(self.classes[i], p) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]
            for values, indices in zip(top.values, top.indices, strict=True)
        ]


def _folder_batches(root: Path, classes: list[str], size: int, batch_size: int, workers: int):
    """All images of ``root``, or of its held-out folder (val/, test/, ...) when it has one,
    with the checkpoint's classes."""
    held_out = held_out_folder(root)
    if held_out is not None:
        root = held_out
    elif (root / "train").is_dir():
        raise ReslabError(
            f"{root} has train/ but no held-out folder ({HELD_OUT_NAMES}) to evaluate "
            f"on; give --data {root}/train to evaluate on the training images"
        )
    samples, found = scan(root)
    if list(found) != list(classes):
        raise ReslabError(
            f"{root} has classes {list(found)}, the checkpoint was trained on {list(classes)}"
        )
    index = list(range(len(samples)))
    loader = torch.utils.data.DataLoader(
        FolderDataset(samples, size),
        batch_sampler=[index[i : i + batch_size] for i in range(0, len(index), batch_size)],
        num_workers=workers,
    )
    return loader, f"image folder {root} ({len(samples):,} images)"


def evaluate_checkpoint(
    payload: dict,
    data: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 500,
    precision: str = "fp32",
    compile: bool = False,
    shift: int | None = None,
) -> tuple[Evaluation, str]:
    """Evaluate on ``data`` (a folder), else on the test split of the data it was trained on.

    fp32 by default, so the numbers equal an fp32 training run's evaluation (folding batch norm
    changes outputs by float rounding only)."""
    model, config, spec = _setup(payload, precision, compile, shift)
    classes = payload["classes"]
    if data is not None:
        batches, description = _folder_batches(
            Path(data), classes, spec.source_size, batch_size, config.workers
        )
    else:
        source = open_source(replace(config, data_dir=data_dir or config.data_dir))
        batches, description = source.test_batches(batch_size), source.description
    # the prepared model takes fp32 NCHW batches and handles layout and precision itself
    evaluation = evaluate(
        model, batches, spec, len(classes), tta=config.tta, shift=config.tta_shift
    )
    return evaluation, description


def predict_files(
    payload: dict,
    paths: list[str],
    top_k: int = 3,
    precision: str = "auto",
    compile: bool = False,
    shift: int | None = None,
    batch_size: int = 256,
) -> list[list[tuple[str, float]]]:
    """Top-k (class, probability) for each image file, read the way training read images.
    The files are read and classified ``batch_size`` at a time, so a folder's worth of them
    (``predict CKPT dir/*.jpg``) never sits in memory at once."""
    for path in paths:  # a missing file stops the command before any work, not midway
        check_image_file(path)
    classifier = Classifier(payload, precision, compile, shift)
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        results += classifier.top(torch.stack([classifier.read(p) for p in chunk]), top_k)
    return results
