"""A tiny classifier's run folder for the serve tests: a checkpoint as `reslab train` writes
it (model, config, input spec, classes) and a picture beside it."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from reslab.data.transforms import InputSpec
from reslab.engine.checkpoint import make_payload, save_checkpoint
from reslab.engine.config import TrainConfig
from reslab.models import create_model

CLASSES = [f"class {i}" for i in range(10)]


def png(seed: int, size: int = 28, mode: str = "L") -> bytes:
    """A random image of ``mode`` as PNG bytes."""
    g = torch.Generator().manual_seed(seed)
    channels = 1 if mode == "L" else 3
    pixels = torch.randint(0, 256, (size, size, channels), generator=g, dtype=torch.uint8)
    image = Image.fromarray(pixels.squeeze(-1).numpy(), mode)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def tiny_run(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25, in_channels=1, num_classes=10)
    with torch.no_grad():  # batch norm statistics that are not the identity, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    spec = InputSpec(28, 28, 1, (0.286,), (0.353,), "cifar")
    config = TrainConfig(model="resnet20", model_kwargs={"width": 0.25}, epochs=1, tta=True)
    payload = make_payload(
        model, classes=CLASSES, config=config.to_dict(), input=spec.to_dict(), epoch=1
    )
    run = tmp_path / "run"
    save_checkpoint(run / "last.pt", payload)
    Image.new("RGB", (64, 48), (40, 90, 200)).save(run / "curves.png")
    return run
