"""The degradation problem (He et al. 2015, section 4.2, Figure 6) on Fashion-MNIST.

Plain-N and ResNet-N (the CIFAR networks, 6n+2 layers) are trained with one recipe and one
budget; a deeper plain network ending with *higher training error* than a shallower one is the
degradation the paper reports, and shortcuts remove it. This is a fixed-budget loop kept to
what the study needs, not a general trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reslab.engine.budget import now
from reslab.engine.loop import Hook, Loop, StopOnNonFinite
from reslab.engine.loop import run as run_loop
from reslab.engine.plots import pyplot
from reslab.engine.schedules import Schedule, paper_steps
from reslab.errors import ReslabError, finite_positive
from reslab.models.resnet import CIFAR_DEPTHS, create_model

# Fashion-MNIST training set, pixel mean and standard deviation on the [0, 1] scale
MEAN, STD = 0.2860, 0.3530


@dataclass
class DegradationConfig:
    depths: tuple[int, ...] = (20, 56)  # CIFAR depths 6n+2; the paper's Figure 6 uses 20..110
    epochs: int = 5
    train_size: int = 3000  # a random subset of the 60,000 training images
    test_size: int = 1000  # a random subset of the 10,000 test images
    batch_size: int = 128  # as in the paper (section 4.2)
    lr: float = 0.1  # as in the paper; divided by 10 at 50% and 75% of the budget
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0

    def check(self) -> None:
        unknown = [d for d in self.depths if d not in CIFAR_DEPTHS]
        if unknown or len(self.depths) < 2:
            raise ReslabError(
                f"--depths needs two or more CIFAR depths from {sorted(CIFAR_DEPTHS)}, "
                f"got {list(self.depths)}"
            )
        for name in ("epochs", "train_size", "test_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ReslabError(f"--{name.replace('_', '-')} must be at least 1")
        finite_positive("lr", self.lr)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), zero mean and unit variance."""
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1)


def random_subset(
    images: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.randperm(len(labels), generator=generator)[: min(size, len(labels))]
    return normalize(images[keep]), labels[keep]


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    wrong = sum(
        (model(x[i : i + batch]).argmax(1) != y[i : i + batch]).sum().item()
        for i in range(0, len(y), batch)
    )
    return wrong / len(y)


class Classify:
    """A step of the study's recipe on batches of indices into the training images: the
    cross-entropy (``"loss"``), the batch's misclassified images (``"wrong"``), one SGD step.
    It tallies the epoch's summed loss and errors."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x, y):
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.images, self.loss_sum, self.wrong = 0, 0.0, 0

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.images = len(batch)
        logits = self.model(self.x[batch])
        loss = F.cross_entropy(logits, self.y[batch])
        return {"loss": loss, "wrong": (logits.argmax(1) != self.y[batch]).sum()}

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.wrong += losses["wrong"].item()
        self.loss_sum += losses["loss"].item() * self.images


class EpochRow(Hook):
    """Per epoch: the model in training mode, then a row of the mean training loss and error
    (the tallies of :class:`Classify`), the test error and the epoch's seconds, handed to
    ``on_epoch``."""

    def __init__(self, step: Classify, test, on_epoch: Callable[[dict], None]):
        self.step, self.test, self.on_epoch = step, test, on_epoch
        self.started = 0.0

    def before_epoch(self, loop: Loop) -> None:
        self.step.model.train()
        self.started, self.step.wrong, self.step.loss_sum = now(), 0, 0.0

    def after_epoch(self, loop: Loop) -> None:
        images = len(self.step.y)
        self.on_epoch(
            {
                "epoch": loop.epoch,
                "train_loss": self.step.loss_sum / images,
                "train_error": self.step.wrong / images,
                "test_error": error_rate(self.step.model, *self.test),
                "seconds": now() - self.started,
            }
        )


def train_fixed_budget(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    config: DegradationConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """SGD with momentum for ``config.epochs`` on the paper's step schedule
    (:func:`~reslab.engine.schedules.paper_steps`); per epoch, training and test error.

    Training error is that of each mini-batch as it was trained on, averaged over the epoch:
    no second pass over the training set, which would cost a third of the training again.
    """
    x, y = train
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    # the same seed for every model: each sees the same batches in the same order
    order = torch.Generator().manual_seed(config.seed)
    total = config.epochs * -(-len(y) // config.batch_size)
    history = []

    def row(values: dict) -> None:
        history.append(values)
        if on_epoch is not None:
            on_epoch(values)

    step = Classify(model, optimizer, x, y)
    hooks = [
        Schedule(optimizer, lambda loop: paper_steps(loop.step, total)),
        StopOnNonFinite(
            lambda loop, bad: f"the loss became {bad['loss']} in epoch {loop.epoch + 1}; lower --lr"
        ),
        EpochRow(step, test, row),
    ]

    def batches(loop: Loop):
        return torch.randperm(len(y), generator=order).split(config.batch_size)

    run_loop(Loop(epochs=config.epochs), batches, step, hooks)
    return history


def degradation_study(
    config: DegradationConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    on_epoch: Callable[[str, dict], None] | None = None,
) -> dict:
    """Train plain-N and ResNet-N for each depth on uint8 ``(images, labels)`` pairs."""
    config.check()
    generator = torch.Generator().manual_seed(config.seed)
    train_set = random_subset(*train, config.train_size, generator)
    test_set = random_subset(*test, config.test_size, generator)
    runs = []
    for depth in config.depths:
        for residual in (False, True):
            name = f"{'' if residual else 'plain_'}resnet{depth}"
            torch.manual_seed(config.seed)
            model = create_model(name, in_channels=1, num_classes=10)
            history = train_fixed_budget(
                model,
                train_set,
                test_set,
                config,
                None if on_epoch is None else lambda row, name=name: on_epoch(name, row),
            )
            runs.append(
                {
                    "name": name,
                    "depth": depth,
                    "residual": residual,
                    "params": sum(p.numel() for p in model.parameters()),
                    "history": history,
                }
            )
    return {
        "config": {**asdict(config), "depths": list(config.depths)},
        "train_size": len(train_set[1]),
        "test_size": len(test_set[1]),
        "runs": runs,
    }


def final_rows(result: dict) -> list[dict]:
    """One row per network: last epoch's errors and the best test error."""
    return [
        {
            "name": run["name"],
            "depth": run["depth"],
            "residual": run["residual"],
            "params": run["params"],
            "train_error": run["history"][-1]["train_error"],
            "test_error": run["history"][-1]["test_error"],
            "best_test_error": min(h["test_error"] for h in run["history"]),
            "minutes": sum(h["seconds"] for h in run["history"]) / 60,
        }
        for run in result["runs"]
    ]


def plot_degradation(result: dict, path: str | Path) -> Path:
    """He et al. 2015, Figure 6: thin dashed = training error, bold = test error."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    depths = result["config"]["depths"]
    colours = dict(zip(depths, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, residual, title in ((axes[0], False, "plain"), (axes[1], True, "ResNet")):
        for run in (r for r in result["runs"] if r["residual"] == residual):
            epochs = [h["epoch"] for h in run["history"]]
            colour = colours[run["depth"]]
            label = f"{title}-{run['depth']}"
            ax.plot(
                epochs,
                [100 * h["train_error"] for h in run["history"]],
                "--",
                color=colour,
                linewidth=1,
            )
            ax.plot(
                epochs,
                [100 * h["test_error"] for h in run["history"]],
                "-",
                color=colour,
                linewidth=2.5,
                label=label,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{title} networks")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(title="bold: test, dashed: train")
    axes[0].set_ylabel("error (%)")
    c = result["config"]
    fig.suptitle(
        f"Fashion-MNIST, {result['train_size']:,} training images, {c['epochs']} epochs, "
        f"batch {c['batch_size']}, lr {c['lr']}"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
