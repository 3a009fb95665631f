"""Grad-CAM: the map finds the region that decides the class, and no hook is left behind."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from reslab.errors import ReslabError
from reslab.explain import find_layer, grad_cam, grad_cam_logits, overlay
from reslab.models import create_model


class Regions(nn.Module):
    """Class k is read from region k of the image alone: ``layer`` blurs the image into one
    channel per class and zeroes each channel outside its class's half (left, right), and
    the logit of class k is its channel's mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 9)
        masks = torch.zeros(2, 1, 28, 28)
        masks[0, :, :, :14] = masks[1, :, :, 14:] = 1
        self.register_buffer("masks", masks.transpose(0, 1))  # (1, 2, 28, 28)
        self.stage_names = ["layer"]
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layer(self.conv(x) * self.masks)  # (N, 2, 28, 28)
        return features.mean((2, 3))


def squares() -> torch.Tensor:
    """(1, 1, 28, 28): a dim square in the left half, a bright one in the right half."""
    x = torch.zeros(1, 1, 28, 28)
    x[..., 4:11, 3:10] = 0.5  # left
    x[..., 15:22, 18:25] = 1.0  # right
    return x


def peak_in(cam: torch.Tensor, rows: range, cols: range) -> bool:
    row, col = divmod(int(cam.flatten().argmax()), cam.shape[-1])
    return row in rows and col in cols


def test_the_map_peaks_on_the_region_that_decides():
    x = squares().repeat(2, 1, 1, 1)
    cams, logits, classes = grad_cam_logits(Regions(), x, torch.tensor([0, 1]))
    assert classes.tolist() == [0, 1] and cams.shape == (2, 28, 28)
    assert cams.min() >= 0 and cams.amax((1, 2)).allclose(torch.ones(2))
    # class 0 is read from the left half: its map peaks on the dim left square, not on the
    # brighter right one, and is zero where the class does not look
    assert peak_in(cams[0], range(4, 11), range(3, 10)) and cams[0, :, 15:].max() == 0
    assert peak_in(cams[1], range(15, 22), range(18, 25)) and cams[1, :, :13].max() == 0
    # the predicted class is the bright square's
    assert torch.equal(grad_cam(Regions(), squares()), cams[1:])


def test_a_named_stage_gives_a_map_at_input_resolution(resnet):
    x = torch.randn(3, 1, 28, 28)
    for layer in (None, "layer1", "layer3.0"):
        cams = grad_cam(resnet, x, target=2, layer=layer)
        assert cams.shape == (3, 28, 28) and 0 <= cams.min() and cams.max() <= 1


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_channels=1, widths=(4, 8, 16))


def test_the_default_target_is_the_predicted_class(resnet):
    x = torch.randn(2, 1, 28, 28)
    predicted = resnet.eval()(x).argmax(1)
    resnet.train()
    assert torch.equal(grad_cam(resnet, x), grad_cam(resnet, x, target=predicted))
    assert resnet.training  # left in the mode it was in


def test_no_hook_is_left_on_the_model(resnet):
    def hooks():
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in resnet.modules()
        )

    x = torch.randn(1, 1, 28, 28)
    grad_cam(resnet, x)
    assert hooks() == 0
    with pytest.raises(ReslabError, match="outside"):  # an error midway removes it too
        grad_cam(resnet, x, target=5)
    assert hooks() == 0
    assert all(p.grad is None for p in resnet.parameters())  # the weights' gradients untouched


def test_unknown_layer_names_the_stages(resnet):
    with pytest.raises(ReslabError, match="layer1, layer2, layer3"):
        find_layer(resnet, "layer9")


def test_overlay_is_the_image_size_and_red_where_the_map_is_high():
    image = Image.new("L", (40, 20), 128)
    cam = torch.zeros(10, 20)
    cam[:, 10:] = 1.0  # the right half
    out = overlay(image, cam)
    assert out.size == (40, 20) and out.mode == "RGB"
    right, left = out.getpixel((35, 10)), out.getpixel((5, 10))
    assert right[0] > right[2] and left[2] > left[0]
