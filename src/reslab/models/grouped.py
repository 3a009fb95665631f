"""Several independent copies of one model as a single grouped network: many seeds in one pass.

Copy ``i`` reads input channels ``[i*C, (i+1)*C)`` and owns output ``[:, i]``. Its convolutions
are the ``i``-th groups of grouped convolutions, its batch norms are channels of one batch norm
(batch norm is per channel, so per copy), and the classifiers are one batched matrix product.
Nothing mixes copies: the sum of the copies' losses gives each its own gradient, and any
per-element optimizer step (SGD with momentum, weight decay, an EMA of the weights) moves each
copy as it would move alone. On a GPU, where one small model leaves the device mostly idle
between kernel launches, the copies share every launch, so a recipe can be judged over N
seeds at a fraction of N runs' cost (``benchmarks/seed_screen.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.models.blocks import PadShortcut
from reslab.models.resnet import ResNet, create_model


class GroupedLinear(nn.Module):
    """``copies`` linear layers side by side: (B, copies * in) -> (B, copies * out)."""

    def __init__(self, copies: int, in_features: int, out_features: int):
        super().__init__()
        self.copies = copies
        self.weight = nn.Parameter(torch.empty(copies, out_features, in_features))
        # one dimension, as a single model's bias: optimizers that skip weight decay on
        # parameters of ndim <= 1 (reslab's make_optimizer) treat both alike
        self.bias = nn.Parameter(torch.empty(copies * out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], self.copies, -1)  # (B, copies, in)
        return torch.einsum("bci,coi->bco", x, self.weight).flatten(1) + self.bias


class GroupedCopies(nn.Module):
    """``copies`` models of one registry name and kwargs; see the module docstring."""

    def __init__(self, network: ResNet, copies: int, num_classes: int, spec: dict):
        super().__init__()
        self.network = network
        self.copies = copies
        self.num_classes = num_classes
        self.spec = spec  # the copies' own spec: what unpack rebuilds each of them from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, copies * C, H, W) -> (B, copies, num_classes)."""
        return self.network(x).view(x.shape[0], self.copies, self.num_classes)


def _leaves(module: nn.Module) -> list[nn.Module]:
    kinds = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.Linear, GroupedLinear)
    return [m for m in module.modules() if isinstance(m, kinds)]


def _group_convolutions(module: nn.Module, copies: int) -> None:
    """Replace every convolution below ``module`` by its grouped twin of ``copies`` groups."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            if child.in_channels % copies or child.out_channels % copies or child.groups != 1:
                raise ReslabError(f"convolution {name} ({child}) does not split into {copies}")
            grouped = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                groups=copies,
                bias=child.bias is not None,
            )
            setattr(module, name, grouped)
        else:
            _group_convolutions(child, copies)


def pack(models: Sequence[ResNet]) -> GroupedCopies:
    """One grouped network holding the weights and batch-norm statistics of ``models``, which
    must share one registry name and kwargs (``model.spec``) and differ only in their values."""
    if not models:
        raise ReslabError("pack needs at least one model")
    spec = models[0].spec
    if any(m.spec != spec for m in models):
        raise ReslabError("pack needs copies of one model (the same name and kwargs)")
    if any(isinstance(m, PadShortcut) for m in models[0].modules()):
        # option A pads the new channels with zeros at both ends of the whole channel axis,
        # which in a grouped network would land in the first and last copies only
        raise ReslabError("shortcut option A does not split into copies; use B, C or D")
    n, first = len(models), models[0]
    kwargs = dict(spec["kwargs"])
    stage_widths = [stage[0].conv1.out_channels for stage in first.stages]
    kwargs.update(
        in_channels=n * first.conv1.in_channels,
        widths=[n * w for w in stage_widths],
        width=1.0,
        num_classes=first.fc.out_features,
    )
    network = create_model(spec["name"], **kwargs)
    _group_convolutions(network, n)
    network.fc = GroupedLinear(n, first.fc.in_features, first.fc.out_features)
    network.to(first.fc.weight)  # the copies' device and dtype
    grouped = GroupedCopies(network, n, first.fc.out_features, spec)
    targets, sources = _leaves(network), [_leaves(m) for m in models]
    if any(len(s) != len(targets) for s in sources):
        raise ReslabError("the copies' layers do not line up with the grouped network's")
    with torch.no_grad():
        for index, target in enumerate(targets):
            parts = [s[index] for s in sources]
            if isinstance(target, GroupedLinear):
                target.weight.copy_(torch.stack([p.weight for p in parts]))
                target.bias.copy_(torch.cat([p.bias for p in parts]))
                continue
            for key, value in target.state_dict().items():
                if key == "num_batches_tracked":
                    value.copy_(parts[0].num_batches_tracked)
                    continue
                joined = torch.cat([p.state_dict()[key] for p in parts])
                if joined.shape != value.shape:
                    raise ReslabError(
                        f"layer {index} ({type(target).__name__}.{key}) has shape "
                        f"{tuple(value.shape)} grouped, {tuple(joined.shape)} from the copies"
                    )
                value.copy_(joined)
    return grouped


def unpack(grouped: GroupedCopies) -> list[ResNet]:
    """The copies as separate models on the CPU, each with its own weights and statistics
    (for :func:`reslab.engine.evaluate.evaluate`, export or a checkpoint)."""
    n, dtype = grouped.copies, grouped.network.fc.weight.dtype
    models = [
        create_model(grouped.spec["name"], **grouped.spec["kwargs"]).to(dtype) for _ in range(n)
    ]
    targets = [_leaves(m) for m in models]
    with torch.no_grad():
        for index, source in enumerate(_leaves(grouped.network)):
            if isinstance(source, GroupedLinear):
                for i, t in enumerate(targets):
                    t[index].weight.copy_(source.weight[i])
                    t[index].bias.copy_(source.bias.view(n, -1)[i])
                continue
            for key, value in source.state_dict().items():
                value = value.cpu()
                for i, t in enumerate(targets):
                    part = value if key == "num_batches_tracked" else value.chunk(n)[i]
                    t[index].state_dict()[key].copy_(part)
    return models
