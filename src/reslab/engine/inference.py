"""Using a trained checkpoint: evaluate it on a data set, classify image files, show where it
looks in them (Grad-CAM)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageOps

from reslab import fast
from reslab.data.folders import (
    HELD_OUT_NAMES,
    FolderDataset,
    check_image_file,
    held_out_folder,
    open_image,
    scan,
    to_8bit,
)
from reslab.data.transforms import InputSpec, to_input
from reslab.engine.checkpoint import atomic_write, model_from_checkpoint, require_classifier
from reslab.engine.config import TrainConfig
from reslab.engine.evaluate import Evaluation, evaluate, logits
from reslab.engine.state import open_source
from reslab.errors import ReslabError, check_whole
from reslab.explain import find_layer, grad_cam_logits, overlay


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
        spec = self.spec
        return open_image(source, spec.channels, spec.source_size, name, spec.resize)

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


def _folder_batches(root: Path, classes: list[str], spec: InputSpec, batch_size: int, workers: int):
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
        FolderDataset(samples, spec.source_size, spec.resize),
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
    top: int = 0,
) -> tuple[Evaluation, str]:
    """Evaluate on ``data`` (a folder), else on the test split of the data it was trained on;
    with ``top``, keep the ``top`` images of highest loss (:class:`TopLosses`).

    fp32 by default, so the numbers equal an fp32 training run's evaluation (folding batch norm
    changes outputs by float rounding only)."""
    model, config, spec = _setup(payload, precision, compile, shift)
    classes = payload["classes"]
    if data is not None:
        batches, description = _folder_batches(
            Path(data), classes, spec, batch_size, config.workers
        )
    else:
        source = open_source(replace(config, data_dir=data_dir or config.data_dir))
        batches, description = source.test_batches(batch_size), source.description
    # the prepared model takes fp32 NCHW batches and handles layout and precision itself
    evaluation = evaluate(
        model, batches, spec, len(classes), tta=config.tta, shift=config.tta_shift, top=top
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


def cam_path(path: str | Path) -> Path:
    """Where the Grad-CAM overlay of image ``path`` goes: beside it, ``NAME.gradcam.png``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.gradcam.png")


# overlays of images smaller than this (a 28x28 Fashion-MNIST item) are enlarged to it, so
# that the map's cells can be seen
CAM_SIDE = 224


def class_index(classes: list[str], name: str | int) -> int:
    """A class given by name or index, as ``--class`` takes it."""
    if isinstance(name, str) and name in classes:
        return classes.index(name)
    if str(name).isdigit() and int(name) < len(classes):
        return int(name)
    raise ReslabError(
        f"--class {name!r} is not one of the checkpoint's classes: {', '.join(classes)} "
        f"(or an index 0..{len(classes) - 1})"
    )


def explain_files(
    payload: dict,
    paths: list[str],
    target: str | int | list[int] | None = None,
    layer: str | None = None,
) -> list[tuple[Path, str, float]]:
    """Write a Grad-CAM overlay beside each image file (:func:`cam_path`), for ``target`` (a
    class name or index for all, an index per image, or None for each image's predicted
    class) from
    ``layer`` (None: the last stage). Returns (overlay file, class explained, its
    probability) per image. Every image is read before any file is written, so an unreadable
    one leaves nothing behind. The maps come from the fp32 model without test-time views."""
    require_classifier(
        payload, "explain takes image classifiers; `reslab detect predict` draws a detector's boxes"
    )
    if isinstance(target, str):
        target = class_index(payload["classes"], target)
    for path in paths:
        check_image_file(path)
    spec = InputSpec.from_dict(payload["input"])
    model = model_from_checkpoint(payload).eval()
    find_layer(model, layer)  # a wrong name fails before the images are read
    images = torch.stack(
        [open_image(p, spec.channels, spec.source_size, resize=spec.resize) for p in paths]
    )
    originals = [_upright(p) for p in paths]
    cams, logits, explained = grad_cam_logits(model, to_input(images, spec), target, layer)
    probs = logits.softmax(1).gather(1, explained[:, None])[:, 0]
    results = []
    for path, original, cam, k, p in zip(paths, originals, cams, explained, probs, strict=True):
        picture = overlay(original, cam)
        out = atomic_write(cam_path(path), lambda f, picture=picture: picture.save(f, "PNG"))
        results.append((out, payload["classes"][int(k)], float(p)))
    return results


def _upright(path: str | Path) -> Image.Image:
    """The image as viewers show it (EXIF orientation applied), in RGB, enlarged to
    :data:`CAM_SIDE` when smaller."""
    with Image.open(path) as image:
        image = to_8bit(ImageOps.exif_transpose(image), path).convert("RGB")
    scale = CAM_SIDE / max(image.size)
    if scale > 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.NEAREST)
    return image
