"""Gradient flow by depth: plain networks against their residual twins.

For each pair, one forward/backward pass on a real batch gives the gradient norm of every
convolution's weight, once at initialisation and once after a short training. Shortcut
projections are left out: they exist only in the residual twin, and leaving them out makes
layer index ``i`` the same convolution in both networks.

What it shows (``reslab study gradients``; docs/studies.md): with batch norm, a deep plain
network's gradients do not vanish at initialisation, they grow towards the input (Yang et al.
2019, "A Mean Field Theory of Batch Normalization"), and after a short training they shrink
towards it instead; the residual twins keep their layers' gradients within a narrow range at
both points. He et al. 2015 (section 4.1) call their plain nets' backward norms "healthy" and
blame degradation on optimisation difficulty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reslab.analysis.degradation import normalize
from reslab.engine.plots import pyplot
from reslab.errors import ReslabError, finite_positive
from reslab.models.resnet import MODELS, create_model

DEFAULT_DEPTHS = ("resnet20", "resnet56", "resnet110", "resnet18", "resnet34")
# 28x28 images: the ImageNet depths use the "small" stem (28 -> 14 at stage 1), the CIFAR
# depths their own 3x3 stem, as the registry defines it
STEM_FOR_28 = {"imagenet": "small"}


@dataclass
class GradientConfig:
    names: tuple[str, ...] = DEFAULT_DEPTHS  # residual networks; each gets its plain_ twin
    batch_size: int = 64
    steps: int = 20  # SGD steps of the "after training" measurement
    lr: float = 0.02  # low enough that plain-110 does not diverge in those steps
    seed: int = 0

    def check(self) -> None:
        bad = [n for n in self.names if n not in MODELS or n.startswith(("plain_", "preact_"))]
        if bad:
            raise ReslabError(
                f"expected residual model names such as resnet20 or resnet34 (their plain_ twins "
                f"are added), got {bad}"
            )
        if self.batch_size < 2 or self.steps < 0:
            raise ReslabError("--batch-size must be at least 2 (batch norm) and --steps >= 0")
        finite_positive("lr", self.lr)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions on the main path, input to output (registration order is forward)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and "downsample" not in name
    ]


def conv_gradient_norms(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, list[float]]:
    """(loss, L2 norm of each main-path conv weight's gradient) for one batch, in train mode.

    Train mode because batch norm then normalises by the batch's own statistics, as it does
    while the network learns.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    norms = [m.weight.grad.norm().item() for _, m in conv_layers(model)]
    model.zero_grad(set_to_none=True)
    return loss.item(), norms


def train_steps(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def build(name: str) -> nn.Module:
    stem = MODELS[name]["stem"]
    return create_model(name, in_channels=1, num_classes=10, stem=STEM_FOR_28.get(stem, stem))


def gradient_study(
    config: GradientConfig, images: torch.Tensor, labels: torch.Tensor, on_model=None
) -> dict:
    """Per-layer gradient norms of each network and its plain twin, at init and after training.

    ``images`` are uint8 (N, 28, 28); the measured batch is the first ``batch_size`` of them,
    the same for every network, and training draws from all of them.
    """
    config.check()
    x, y = normalize(images), labels
    probe_x, probe_y = x[: config.batch_size], y[: config.batch_size]
    runs = []
    for residual_name in config.names:
        for name in ("plain_" + residual_name, residual_name):
            if on_model is not None:
                on_model(name)
            torch.manual_seed(config.seed)
            model = build(name)
            init_loss, init = conv_gradient_norms(model, probe_x, probe_y)
            generator = torch.Generator().manual_seed(config.seed)
            train_steps(model, x, y, config.steps, config.lr, config.batch_size, generator)
            trained_loss, trained = conv_gradient_norms(model, probe_x, probe_y)
            runs.append(
                {
                    "name": name,
                    "pair": residual_name,
                    "residual": name == residual_name,
                    "layers": [n for n, _ in conv_layers(model)],
                    "init": {"loss": init_loss, "norms": init},
                    "trained": {"loss": trained_loss, "norms": trained},
                }
            )
    return {
        "config": {**config.__dict__, "names": list(config.names)},
        "runs": runs,
    }


def summary_rows(result: dict) -> list[dict]:
    """First and last layer's gradient norm and their ratio, per network and moment."""
    rows = []
    for run in result["runs"]:
        for moment in ("init", "trained"):
            norms = run[moment]["norms"]
            rows.append(
                {
                    "name": run["name"],
                    "moment": moment,
                    "layers": len(norms),
                    "loss": run[moment]["loss"],
                    "first": norms[0],
                    "last": norms[-1],
                    "ratio": norms[0] / norms[-1],
                    "finite": all(map(math.isfinite, norms)),
                }
            )
    return rows


def plot_gradients(result: dict, path: str | Path) -> Path:
    """Log gradient norm against layer index; solid = residual, dashed = plain."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    pairs = list(dict.fromkeys(run["pair"] for run in result["runs"]))
    colours = dict(zip(pairs, plt.get_cmap("tab10").colors, strict=False))
    steps = result["config"]["steps"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, moment, title in (
        (axes[0], "init", "at initialisation"),
        (axes[1], "trained", f"after {steps} SGD steps"),
    ):
        for run in result["runs"]:
            norms = run[moment]["norms"]
            ax.plot(
                range(1, len(norms) + 1),
                norms,
                "-" if run["residual"] else "--",
                color=colours[run["pair"]],
                linewidth=1.8 if run["residual"] else 1.2,
                label=run["name"].replace("resnet", "ResNet-").replace("plain_ResNet", "plain"),
            )
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("conv layer (input -> output)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("gradient norm of the conv weight")
    axes[1].legend(fontsize=7, ncol=2, title="solid: residual, dashed: plain")
    fig.suptitle(f"Gradient flow on one Fashion-MNIST batch of {result['config']['batch_size']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
