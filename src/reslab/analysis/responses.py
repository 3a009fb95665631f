"""Layer responses of trained plain and residual networks (He et al. 2015, section 4.2,
Figure 7) on Fashion-MNIST.

A response is the output of a 3x3 convolution's batch norm, before the ReLU or the addition
that follows it; its standard deviation, over a fixed batch of test images in evaluation
mode, is taken for every such layer of a trained network. The paper finds residual
responses generally smaller than plain ones, and a deeper residual network's smaller still:
residual functions closer to zero than non-residual ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from reslab.analysis.degradation import DegradationConfig, prepared_sets, train_network
from reslab.engine.plots import pyplot

# the study's budget: fields of DegradationConfig; the paper's CIFAR stem, so that the
# layers are the paper's; about 12 minutes of one idle core (benchmarks/study_time.py)
DEFAULT = dict(
    depths=(20, 56), epochs=3, train_size=10_000, test_size=1000, pad=2, channels_last=True
)


def response_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The batch norms that directly follow a 3x3 convolution, in forward order: the stem's
    and each basic block's ``bn1`` and ``bn2``."""
    norms = [model.bn1] if model.conv1.kernel_size == (3, 3) else []
    for stage in model.stages:
        for block in stage:
            norms += [block.bn1, block.bn2]
    return norms


@torch.no_grad()
def response_stds(model: nn.Module, images: torch.Tensor) -> list[float]:
    """The standard deviation of each response on ``images``, in layer order. Forward hooks
    record them; they are removed afterwards, whatever happens."""
    stds: list[float] = []
    handles = [
        norm.register_forward_hook(lambda m, inputs, out: stds.append(out.float().std().item()))
        for norm in response_norms(model)
    ]
    try:
        model.eval()
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return stds


def response_study(
    config: DegradationConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    on_epoch: Callable[[str, dict], None] | None = None,
) -> dict:
    """Train plain-N and ResNet-N for each depth, then measure their responses on the test
    images (``config.test_size`` of them)."""
    config.check(min_depths=1)
    train_set, test_set = prepared_sets(config, train, test)
    networks = []
    for depth in config.depths:
        for residual in (False, True):
            name = f"{'' if residual else 'plain_'}resnet{depth}"
            model, record = train_network(name, config, train_set, test_set, on_epoch)
            stds = response_stds(model, test_set[0])
            networks.append(
                {
                    "name": name,
                    "depth": depth,
                    "residual": residual,
                    "final": record["history"][-1],
                    "layer_std": stds,
                    "sorted_std": sorted(stds, reverse=True),
                    "mean_std": sum(stds) / len(stds),
                }
            )
    result = {
        "config": {**asdict(config), "depths": list(config.depths)},
        "train_size": len(train_set[1]),
        "test_size": len(test_set[1]),
        "networks": networks,
    }
    result["reading"] = reading(networks)
    return result


def reading(networks: list[dict]) -> list[dict]:
    """The paper's two findings on the mean response std over a network's layers: residual
    below plain at each depth; the deepest residual network below the shallowest."""
    by = {(n["residual"], n["depth"]): n["mean_std"] for n in networks}
    depths = sorted({n["depth"] for n in networks})
    found = [
        {
            "finding": f"ResNet-{d} responses smaller than plain-{d}",
            "holds": by[(True, d)] < by[(False, d)],
            "residual": by[(True, d)],
            "plain": by[(False, d)],
        }
        for d in depths
    ]
    if len(depths) > 1:
        deep, shallow = depths[-1], depths[0]
        found.append(
            {
                "finding": f"ResNet-{deep} responses smaller than ResNet-{shallow}",
                "holds": by[(True, deep)] < by[(True, shallow)],
                "deeper": by[(True, deep)],
                "shallower": by[(True, shallow)],
            }
        )
    return found


def plot_responses(result: dict, path: str | Path) -> Path:
    """Figure 7's two panels: std by layer in the original order (top) and sorted in
    descending order (bottom); dashed plain, solid residual."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.5))
    colours = dict(zip(result["config"]["depths"], plt.get_cmap("tab10").colors, strict=False))
    for net in result["networks"]:
        style = "-" if net["residual"] else "--"
        label = f"{'ResNet' if net['residual'] else 'plain'}-{net['depth']}"
        for ax, key in zip(axes, ("layer_std", "sorted_std"), strict=True):
            values = net[key]
            ax.plot(
                range(1, len(values) + 1), values, style, color=colours[net["depth"]], label=label
            )
    axes[0].set_title("layer index (original order)")
    axes[1].set_title("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std of response")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
