"""Fuzzing the input validators with Hypothesis: COCO annotation files and training-config
values, generated hostile, are either accepted or refused with a ``ReslabError``, never
another exception. The example counts are bounded (and the runs derandomized, so every run
tries the same examples) to keep the file within a few seconds."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.io import write_png

from reslab.data.coco import CocoDetection
from reslab.engine.config import TrainConfig, config_from_flags, validate
from reslab.errors import ReslabError

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# any JSON value, kept small
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 50)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)

BASE = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "b.png", "width": 20, "height": 10},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 2, "category_id": 4, "bbox": [2, 2, 8, 4], "iscrowd": 0},
    ],
    "categories": [{"id": 3, "name": "three"}, {"id": 4, "name": "four"}],
}
KEYS = {
    "images": ["id", "file_name", "width", "height"],
    "annotations": ["id", "image_id", "category_id", "bbox", "iscrowd"],
    "categories": ["id", "name"],
}
# values a real exporter gets wrong, beside arbitrary JSON
PLAUSIBLE = st.sampled_from(
    [1, 2, 3, 4, 0, -1, 2.5, "1", "a.png", "b.png", "../a.png", "\x00", True, None, [1, 1, 5, 5],
     [1, 1, 0, 5], ["1", "1", "5", "5"], [1, 1, 5], [1e308, 1, 1e308, 5], [-50, 1, 5, 5], {}, []]
)  # fmt: skip


@st.composite
def coco_documents(draw):
    """BASE with a few entries changed, removed or added, or now and then any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    doc = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(KEYS)))
        entries = doc[section]
        action = draw(st.sampled_from(["set", "delete", "append", "replace"]))
        if action == "append" or not entries:
            entries.append(dict(draw(st.sampled_from(BASE[section]))))
        elif action == "replace":
            entries[draw(st.integers(0, len(entries) - 1))] = draw(JSON | PLAUSIBLE)
        else:
            entry = entries[draw(st.integers(0, len(entries) - 1))]
            key = draw(st.sampled_from(KEYS[section]))
            if not isinstance(entry, dict):
                continue
            if action == "delete":
                entry.pop(key, None)
            else:
                entry[key] = draw(PLAUSIBLE | JSON)
    if draw(st.integers(0, 5)) == 0:
        doc[draw(st.sampled_from(sorted(KEYS)))] = draw(JSON)
    return doc


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    for name in ("a.png", "b.png"):
        write_png(torch.zeros(3, 10, 20, dtype=torch.uint8), str(folder / name))
    return folder


@FUZZ
@given(doc=coco_documents())
def test_every_coco_document_is_accepted_or_refused_with_a_reslab_error(images_dir, doc):
    path = images_dir / "ann.json"
    path.write_text(json.dumps(doc))
    try:
        dataset = CocoDetection(images_dir, path)
    except ReslabError as error:
        assert str(error).startswith(str(path)), error
        return
    assert len(dataset) == len(doc["images"]) and dataset.num_classes >= 2


CONFIG_KEYS = sorted(
    {"model", "stem", "width", "widths", "shortcut", "se", "epochs", "batch_size",
     "eval_batch_size", "lr", "optimizer", "schedule", "weight_decay", "momentum",
     "label_smoothing", "precision", "crop", "crop_padding", "tta_shift", "ema", "max_minutes",
     "threads", "save_every", "val_fraction", "image_size", "warmup", "cutmix", "seed"}
)  # fmt: skip
CONFIG_VALUES = st.sampled_from(
    [0, 1, -1, 3, 0.5, 1e9, float("nan"), float("inf"), "", "x", "resnet20", "fp32", "sgd",
     True, None, [], [16, 32, 64], {}]
) | JSON  # fmt: skip


@FUZZ
@given(values=st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, max_size=4))
def test_every_config_value_is_accepted_or_refused_with_a_reslab_error(values):
    try:
        config, _, _ = config_from_flags(None, values)
        validate(config)
        validate(TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))))
    except ReslabError as error:
        assert "\n" not in str(error), error
