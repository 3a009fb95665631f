"""The two figures of a run folder: learning curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import torch


def pyplot():
    """matplotlib.pyplot drawing to files only (no display on a training machine), imported
    when a figure is drawn: importing it takes about a second, which every command, `--help`
    included, would otherwise pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs test."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
        ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, classes: tuple[str, ...], path: Path) -> None:
    """:func:`confusion_figure` saved to ``path``."""
    plt = pyplot()
    fig = confusion_figure(confusion, classes)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_figure(fig, path: Path) -> Path:
    """A figure written to ``path`` as a PNG whole or not at all, then closed."""
    from reslab.engine.checkpoint import atomic_write

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        pyplot().close(fig)


def confusion_figure(confusion: torch.Tensor, classes: tuple[str, ...]):
    """Counts with true class as rows, predictions as columns, each row's share as colour."""
    plt = pyplot()
    k = len(classes)
    shares = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k))
    ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true")
    for i in range(k):
        for j in range(k):
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7, color=color)
    accuracy = confusion.diag().sum().item() / max(confusion.sum().item(), 1)
    ax.set_title(f"confusion matrix, accuracy {100 * accuracy:.2f}%")
    fig.tight_layout()
    return fig


def top_losses_figure(top, classes: list[str], columns: int = 5):
    """fastai's ``plot_top_losses``: each image (highest loss first) titled with the model's
    class and its probability, the true class and the loss."""
    plt = pyplot()
    n = len(top.loss)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.4 * columns, 2.9 * rows), squeeze=False, layout="constrained"
    )
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= n:
            continue
        image = top.images[index].permute(1, 2, 0).numpy()  # (H, W, C) uint8
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"predicted {classes[int(top.predicted[index])]} "
            f"{100 * float(top.probability[index]):.0f}%\n"
            f"true {classes[int(top.labels[index])]}, loss {float(top.loss[index]):.2f}",
            fontsize=8,
        )
    fig.suptitle("top losses: predicted (probability) / true class / loss")
    return fig
