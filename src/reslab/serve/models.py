"""What `reslab serve` runs: a checkpoint's classifier or detector, fed batches of uploads.

Each service turns a batch of uploaded files into one result per file (or the error that file
earns), through the same reading and model code as `reslab predict` and `reslab detect
predict`: :class:`reslab.engine.inference.Classifier` and
:func:`reslab.engine.detect_infer.detect_images`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from reslab.data.coco import decode_rgb
from reslab.data.transforms import to_input
from reslab.engine.checkpoint import model_from_checkpoint
from reslab.engine.detect_infer import detect_images, prepare_detector_for_inference
from reslab.engine.detection import detector_from_checkpoint
from reslab.engine.inference import Classifier
from reslab.errors import ReslabError
from reslab.precision import resolve_precision


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str  # the file's name, for messages
    top: int = 5  # classes to return, best first


class _Clock:
    """Adds the seconds spent in each named stage of a batch to ``stages``."""

    def __init__(self, stages: dict[str, float]):
        self.stages, self.last = stages, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self.last
        self.last = now


def _decode_all(read, uploads: Sequence[Upload]) -> tuple[list, list]:
    """(decoded images, and per upload its image's index or the error reading it gave)."""
    images, slots = [], []
    for upload in uploads:
        try:
            images.append(read(upload.data, upload.name))
            slots.append(len(images) - 1)
        except ReslabError as error:
            slots.append(error)
    return images, slots


class ClassifierService:
    task = "classification"
    explains = True
    EXPLAIN_SIDE = 224  # pixels of the Grad-CAM overlay's side: a 28-pixel image made visible

    def __init__(self, payload: dict, precision: str = "auto", fast_path: bool = True):
        self.classifier = Classifier(payload, precision, fast_path=fast_path)
        self.payload = payload
        # Grad-CAM needs the layers as trained (batch norm not folded into them) and gradients
        self.eager = model_from_checkpoint(payload).eval().requires_grad_(False)

    def check_explain(self, target: str | None, layer: str | None) -> None:
        """A class name and a layer name that :meth:`explain` can use, or a ReslabError."""
        from reslab.explain import find_layer

        classes = self.classifier.classes
        if target is not None and target not in classes:
            raise ReslabError(f"class {target!r} is not one of the model's: {', '.join(classes)}")
        find_layer(self.eager, layer)

    def explain(self, upload: Upload, target: str | None = None, layer: str | None = None):
        """A PNG of the upload, as the model sees it, with the Grad-CAM map (Selvaraju et al.
        2017) of ``target`` (a class name; default: the predicted class) in ``layer`` (a
        module's name; default: the last stage) over it."""
        from reslab.explain import grad_cam, overlay

        classes = self.classifier.classes
        image = self.classifier.read(upload.data, upload.name)  # uint8 (C, S, S)
        x = to_input(image[None], self.classifier.spec)
        index = None if target is None else classes.index(target)
        cam = grad_cam(self.eager, x, index, layer)[0]
        pixels = image.permute(1, 2, 0).squeeze(-1).numpy()
        side = max(self.EXPLAIN_SIDE, image.shape[-1])
        base = Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST)
        out = io.BytesIO()
        overlay(base, cam).save(out, "PNG")
        return out.getvalue()

    def run(self, uploads: Sequence[Upload], stages: dict[str, float]) -> list:
        clock = _Clock(stages)
        images, slots = _decode_all(self.classifier.read, uploads)
        clock.lap("decode")
        probs = self.classifier.probabilities(torch.stack(images)) if images else None
        clock.lap("model")
        results = []
        for upload, slot in zip(uploads, slots, strict=True):
            if isinstance(slot, Exception):
                results.append(slot)
                continue
            top = probs[slot].topk(min(upload.top, len(self.classifier.classes)))
            ranked = [
                {"class": self.classifier.classes[i], "probability": round(p, 6)}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
            results.append({"task": self.task, "prediction": ranked[0]["class"], "top": ranked})
        return results


class DetectorService:
    task = "detection"
    explains = False  # Grad-CAM explains a classifier's class score

    def __init__(self, payload: dict, precision: str = "auto", fast_path: bool = True):
        model = detector_from_checkpoint(payload)
        self.model = prepare_detector_for_inference(model) if fast_path else model.eval()
        # the detector's own timing rule needs an image; fp32 unless bf16 is asked for
        self.precision, _ = resolve_precision("fp32" if precision == "auto" else precision)
        self.class_names = list(payload["class_names"])
        self.payload = payload

    def run(self, uploads: Sequence[Upload], stages: dict[str, float]) -> list:
        clock = _Clock(stages)
        images, slots = _decode_all(decode_rgb, uploads)
        clock.lap("decode")
        found = (
            detect_images(self.model, images, self.class_names, self.precision) if images else []
        )
        clock.lap("model")
        return [
            slot
            if isinstance(slot, Exception)
            else {
                "task": self.task,
                "width": images[slot].shape[2],
                "height": images[slot].shape[1],
                "detections": found[slot],
            }
            for slot in slots
        ]


def load_service(payload: dict, precision: str = "auto", fast_path: bool = True):
    """The service for a checkpoint: a detector's when it holds one, else a classifier's."""
    kind = DetectorService if payload.get("task") == "detection" else ClassifierService
    return kind(payload, precision, fast_path)
