"""Grad-CAM: where in an image a classifier found the evidence for a class.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", eq. 1-2) weighs each channel k of a layer's activations A^k by
the spatial mean of the class score's gradient, alpha_k = mean_ij dy^c/dA^k_ij, and keeps the
positive part of sum_k alpha_k A^k. The map has the layer's resolution (the last stage: 1/4 of
a CIFAR-stem input, 1/32 of an ImageNet-stem one) and is scaled up to the input's.

It is a few lines on one forward hook, so reslab does not take the ``grad-cam`` package and
its OpenCV, scikit-learn and SciPy for it. The hook only records the layer's output; the
gradient comes from ``torch.autograd.grad`` on that output, so no backward hook is registered
and no parameter's ``.grad`` is touched. :func:`recording` removes the hook when it exits, on
an error too: a leaked hook keeps recording every later forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reslab.errors import ReslabError


def find_layer(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """``layer`` as a module of ``model``: a module, a dotted name (``layer3``,
    ``layer4.1``), or None for the last stage of a reslab ResNet."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        stages = getattr(model, "stage_names", None)
        if not stages:
            raise ReslabError("the model has no stages; name the layer to explain")
        layer = stages[-1]
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        stages = getattr(model, "stage_names", [])
        raise ReslabError(
            f"the model has no layer {layer!r}; the stages are {', '.join(stages)} "
            "(or a block within one, e.g. layer3.0)"
        )
    return modules[layer]


@contextmanager
def recording(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that receives ``layer``'s output at each forward pass while the context is
    open; the hook is removed when it closes, however it closes."""
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    """(N,) class indices: the predicted ones for None, else an index for all or one each."""
    if target is None:
        return logits.argmax(1)
    target = torch.as_tensor(target, dtype=torch.long).expand(len(logits))
    if (target < 0).any() or (target >= logits.shape[1]).any():
        raise ReslabError(f"class index {target.tolist()} is outside 0..{logits.shape[1] - 1}")
    return target


def grad_cam_logits(
    model: nn.Module, images: torch.Tensor, target=None, layer: str | nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps (N, H, W) in [0, 1], logits (N, K), the explained classes (N,)) for a batch of
    model inputs (N, C, H, W); see :func:`grad_cam`."""
    module = find_layer(model, layer)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), recording(module) as outputs:
            # an input that needs its gradient keeps the graph even for a frozen model
            logits = model(images.detach().requires_grad_(True))
            if len(outputs) != 1:
                raise ReslabError(f"layer {layer!r} ran {len(outputs)} times in one forward pass")
            activations = outputs[0]  # (N, C', h, w)
            classes = _targets(target, logits)
            score = logits.gather(1, classes[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        model.train(was_training)
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # alpha_k, (N, C', 1, 1)
    cam = F.relu((weights * activations).sum(1, keepdim=True)).detach()  # (N, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0].clamp_(min=0)
    peak = cam.flatten(1).amax(1).clamp(min=torch.finfo(cam.dtype).tiny)
    return cam / peak[:, None, None], logits.detach(), classes


def grad_cam(
    model: nn.Module, images: torch.Tensor, target=None, layer: str | nn.Module | None = None
) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] at the input's resolution, each scaled so its peak is
    1 (all zero where no location speaks for the class).

    ``images``: the model's input (N, C, H, W), normalised as in training. ``target``: None
    for each image's predicted class, or a class index (one for all, or one per image).
    ``layer``: the module or its name (``layer3``); None for the last stage. The model is
    run in eval mode and left in the mode it was in.
    """
    return grad_cam_logits(model, images, target, layer)[0]


def colorize(cam: torch.Tensor) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 in matplotlib's ``jet`` colour map (blue: low,
    red: high), the colours of the Grad-CAM paper's figures."""
    import matplotlib  # the colour maps alone; pyplot is not needed

    rgba = matplotlib.colormaps["jet"](cam.clamp(0, 1).cpu().numpy())
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: Image.Image, cam: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """``image`` (any mode and size) in RGB with the map (H, W) in [0, 1] scaled to its size
    and blended over it in colour, ``alpha`` the map's share."""
    base = image.convert("RGB")
    cam = cam.detach().float()[None, None]
    cam = F.interpolate(cam, size=(base.height, base.width), mode="bilinear", align_corners=False)
    heat = Image.fromarray(colorize(cam[0, 0]), "RGB")
    return Image.blend(base, heat, alpha)
