"""The degradation problem (He et al. 2015, section 4.2, Figure 6) on Fashion-MNIST.

Plain-N and ResNet-N (the CIFAR networks, 6n+2 layers) are trained with one recipe and one
budget; a deeper plain network ending with *higher training error* than a shallower one is the
degradation the paper reports, and shortcuts remove it: a deeper ResNet ends with lower
training and test error than a shallower one. :func:`check_claims` says, for a finished run,
which of those claims held; the figure's title says so too. This is a fixed-budget loop kept
to what the studies need, not a general trainer; the shortcut and response studies train
their networks with it as well.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reslab.data.transforms import augment
from reslab.engine.budget import epochs_within, now
from reslab.engine.loop import Hook, Loop, StopOnNonFinite
from reslab.engine.loop import run as run_loop
from reslab.engine.plots import pyplot
from reslab.engine.schedules import Schedule, paper_steps
from reslab.errors import ReslabError, finite_positive
from reslab.fast import autocast, memory_format
from reslab.models.resnet import CIFAR_DEPTHS, create_model

# Fashion-MNIST training set, pixel mean and standard deviation on the [0, 1] scale
MEAN, STD = 0.2860, 0.3530


@dataclass
class DegradationConfig:
    """The recipe and budget of one study run. The field defaults are the bare recipe (no
    augmentation, one seed, fp32); :data:`BUDGETS` holds the study's named budgets."""

    depths: tuple[int, ...] = (20, 56)  # CIFAR depths 6n+2; the paper's Figure 6 uses 20..110
    epochs: int = 5
    train_size: int = 3000  # a random subset of the 60,000 training images
    test_size: int = 1000  # a random subset of the 10,000 test images
    batch_size: int = 128  # as in the paper (section 4.2)
    lr: float = 0.1  # as in the paper; divided by 10 at 50% and 75% of the budget
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    seeds: int = 1  # networks trained per depth and kind, seeds seed, seed + 1, ...
    # the paper's augmentation (section 4.2: 4 pixels padded on each side of a 32x32 image, a
    # random 32x32 crop, horizontal flips) at 28 px: 0 for none
    pad: int = 0
    # share of the steps at lr / 10 for networks of 110 layers or more: the paper warms
    # ResNet-110 up at 0.01 for about 400 of 64k iterations (section 4.2)
    warmup: float = 0.0
    # the networks' stem: "cifar", the paper's (stages at 28, 14, 7 px), or "small", a 3x3/2
    # max pool after it (14, 7, 4 px): the same depth at about 2.5x fewer multiply-adds
    stem: str = "cifar"
    precision: str = "fp32"  # fp32 or bf16 autocast (reslab.precision)
    channels_last: bool = False  # NHWC tensors in memory
    # a wall-clock budget for the whole study: with it, the epochs are the most that fit
    # (plan_epochs, from a timed step of each network); 0: the epochs as given
    minutes: float = 0.0

    def check(self, min_depths: int = 2) -> None:
        """Raise ReslabError on a bad value; ``min_depths`` depths at least (the degradation
        study compares two)."""
        unknown = [d for d in self.depths if d not in CIFAR_DEPTHS]
        if unknown or len(self.depths) < min_depths:
            many = "two or more" if min_depths == 2 else "one or more"
            raise ReslabError(
                f"--depths needs {many} CIFAR depths from {sorted(CIFAR_DEPTHS)}, "
                f"got {list(self.depths)}"
            )
        for name in ("epochs", "train_size", "test_size", "batch_size", "seeds"):
            if getattr(self, name) < 1:
                raise ReslabError(f"--{name.replace('_', '-')} must be at least 1")
        finite_positive("lr", self.lr)
        if not 0 <= self.pad <= 14:
            raise ReslabError(f"--pad must be 0 to 14 pixels, got {self.pad}")
        if not 0 <= self.warmup < 0.5:
            raise ReslabError(
                f"--warmup must be a share of the steps in [0, 0.5), got {self.warmup}"
            )
        if self.stem not in ("cifar", "small"):
            raise ReslabError(f"--stem must be cifar or small, got {self.stem!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ReslabError(f"precision must be fp32 or bf16 here, got {self.precision!r}")
        if not 0 <= self.minutes < float("inf"):
            raise ReslabError(f"--minutes must be 0 (no budget) or more, got {self.minutes}")


# The study's budgets: fields of DegradationConfig by name. "default" is the paper's recipe
# on the full Fashion-MNIST sets, compressed to fit an hour on a 2-core CPU (the "small" stem,
# 3 epochs; the estimate and its basis: benchmarks/study_time.py; --minutes plans the epochs to
# a time budget instead); "paper" is the paper's networks and 64k iterations of 128 images
# (137 epochs of 469 batches: 64,253 steps).
FULL_SETS = dict(train_size=60_000, test_size=10_000, seeds=2, pad=2, channels_last=True)
BUDGETS: dict[str, dict] = {
    "default": dict(FULL_SETS, epochs=3, warmup=0.01, stem="small"),
    "paper": dict(FULL_SETS, epochs=137, warmup=0.00625, depths=(20, 32, 44, 56, 110)),
    "small": dict(epochs=5, train_size=3000, test_size=1000),  # the former default: minutes
}


def budget_config(name: str, **overrides) -> DegradationConfig:
    """The named budget of :data:`BUDGETS` with ``overrides`` (``None`` values ignored)."""
    if name not in BUDGETS:
        raise ReslabError(f"--budget must be one of {sorted(BUDGETS)}, got {name!r}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and given.get("minutes"):
        raise ReslabError("--epochs and --minutes both set the epochs; give one of them")
    return DegradationConfig(**{**BUDGETS[name], **given})


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

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x,
        y,
        config: DegradationConfig | None = None,
    ):
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.images, self.loss_sum, self.wrong = 0, 0.0, 0
        config = config or DegradationConfig()
        self.pad, self.precision = config.pad, config.precision
        self.layout = memory_format(config.channels_last)
        # the crops and flips draw from their own stream: the batch order stays the seed's
        self.augment_rng = torch.Generator().manual_seed(config.seed + 1)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.images = len(batch)
        x = self.x[batch]
        if self.pad:
            # a black (zero-intensity) border, as the paper pads with zeros
            x = augment(x, self.pad, 0.0, self.augment_rng, fill=-MEAN / STD)
        with autocast(self.precision) if self.precision != "fp32" else nullcontext():
            logits = self.model(x.contiguous(memory_format=self.layout)).float()
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
    model.to(memory_format=memory_format(config.channels_last))
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

    step = Classify(model, optimizer, x, y, config)
    warmup = round(config.warmup * total)
    hooks = [
        Schedule(
            optimizer,
            lambda loop: paper_steps(loop.step, total) * (0.1 if loop.step < warmup else 1),
        ),
        StopOnNonFinite(
            lambda loop, bad: f"the loss became {bad['loss']} in epoch {loop.epoch + 1}; lower --lr"
        ),
        EpochRow(step, test, row),
    ]

    def batches(loop: Loop):
        return torch.randperm(len(y), generator=order).split(config.batch_size)

    run_loop(Loop(epochs=config.epochs), batches, step, hooks)
    return history


def prepared_sets(
    config: DegradationConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The config's random subsets of uint8 ``(images, labels)``, normalised."""
    generator = torch.Generator().manual_seed(config.seed)
    return (
        random_subset(*train, config.train_size, generator),
        random_subset(*test, config.test_size, generator),
    )


def train_network(
    name: str,
    config: DegradationConfig,
    train_set,
    test_set,
    on_epoch: Callable[[str, dict], None] | None = None,
    **kwargs,
) -> tuple[nn.Module, dict]:
    """One registered network (``kwargs`` to :func:`create_model`) trained on the config's
    recipe from its seed; the model and its run record."""
    torch.manual_seed(config.seed)
    model = create_model(name, in_channels=1, num_classes=10, stem=config.stem, **kwargs)
    label = f"{name} seed {config.seed}" if config.seeds > 1 else name
    history = train_fixed_budget(
        model,
        train_set,
        test_set,
        config,
        None if on_epoch is None else lambda row: on_epoch(label, row),
    )
    record = {
        "name": name,
        "seed": config.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    return model, record


def degradation_study(
    config: DegradationConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    on_epoch: Callable[[str, dict], None] | None = None,
) -> dict:
    """Train plain-N and ResNet-N for each depth and seed on uint8 ``(images, labels)``
    pairs; the runs, and which of the paper's claims held (:func:`check_claims`)."""
    config.check()
    train_set, test_set = prepared_sets(config, train, test)
    runs = []
    for depth in config.depths:
        for residual in (False, True):
            name = f"{'' if residual else 'plain_'}resnet{depth}"
            for seed in range(config.seed, config.seed + config.seeds):
                run_config = replace(
                    config, seed=seed, warmup=config.warmup if depth >= 110 else 0.0
                )
                _, record = train_network(name, run_config, train_set, test_set, on_epoch)
                runs.append({**record, "depth": depth, "residual": residual})
    result = {
        "config": {**asdict(config), "depths": list(config.depths)},
        "train_size": len(train_set[1]),
        "test_size": len(test_set[1]),
        "runs": runs,
    }
    result["claims"] = check_claims(result)
    return result


def final_rows(result: dict) -> list[dict]:
    """One row per network and seed: last epoch's errors and the best test error."""
    return [
        {
            "name": run["name"],
            "seed": run.get("seed", result["config"]["seed"]),
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


def network_rows(result: dict) -> list[dict]:
    """One row per network over its seeds: mean final training and test error, and their
    spread (lowest and highest seed)."""
    rows: dict[str, dict] = {}
    for row in final_rows(result):
        entry = rows.setdefault(
            row["name"],
            {
                "name": row["name"],
                "depth": row["depth"],
                "residual": row["residual"],
                "params": row["params"],
                "train": [],
                "test": [],
            },
        )
        entry["train"].append(row["train_error"])
        entry["test"].append(row["test_error"])
    out = []
    for entry in rows.values():
        train, test = entry.pop("train"), entry.pop("test")
        out.append(
            {
                **entry,
                "seeds": len(train),
                "train_error": sum(train) / len(train),
                "train_range": [min(train), max(train)],
                "test_error": sum(test) / len(test),
                "test_range": [min(test), max(test)],
            }
        )
    return out


def check_claims(result: dict) -> list[dict]:
    """He et al. 2015, Figure 6, as claims on the shallowest and deepest depths of a run, each
    on the mean final error over the seeds: whether it held, and the two numbers compared."""
    by = {(r["residual"], r["depth"]): r for r in network_rows(result)}
    shallow, deep = min(result["config"]["depths"]), max(result["config"]["depths"])
    claims = []
    for key, residual, metric, words in (
        ("plain_deeper_trains_worse", False, "train_error", "higher training error"),
        ("resnet_deeper_trains_better", True, "train_error", "lower training error"),
        ("resnet_deeper_tests_better", True, "test_error", "lower test error"),
    ):
        kind = "ResNet" if residual else "plain"
        a, b = by[(residual, deep)][metric], by[(residual, shallow)][metric]
        held = a > b if words.startswith("higher") else a < b
        claims.append(
            {
                "claim": key,
                "text": f"{kind}-{deep} ends with a {words} than {kind}-{shallow}",
                "held": held,
                "deep": a,
                "shallow": b,
            }
        )
    return claims


TITLE_WIDTH = 100  # characters in one line of the figure's title at its size


def claims_title(claims: list[dict]) -> str:
    """The figure's verdict line: every claim held, or which did not."""
    failed = [c["text"] for c in claims if not c["held"]]
    if not failed:
        return "both halves of the paper's Figure 6 hold here"
    return "NOT shown at this budget: " + "; ".join(failed)


def mean_curves(runs: list[dict], key: str) -> tuple[list[int], list[float], list, list]:
    """Epochs, the mean of ``key`` over the runs (seeds) in percent, its lowest and highest."""
    epochs = [h["epoch"] for h in runs[0]["history"]]
    columns = list(zip(*[[100 * h[key] for h in r["history"]] for r in runs], strict=True))
    return (
        epochs,
        [sum(c) / len(c) for c in columns],
        list(map(min, columns)),
        list(map(max, columns)),
    )


def figure_title(result: dict) -> str:
    """The recipe, then the verdict of :func:`claims_title`, in lines that fit the figure."""
    c = result["config"]
    verdict = claims_title(result.get("claims") or check_claims(result))
    recipe = (
        f"Fashion-MNIST, {result['train_size']:,} training images, {c['epochs']} epochs, "
        f"batch {c['batch_size']}, lr {c['lr']}, mean of {c.get('seeds', 1)} seed(s)"
    )
    return recipe + "\n" + textwrap.fill(verdict, TITLE_WIDTH)


def plot_degradation(result: dict, path: str | Path) -> Path:
    """He et al. 2015, Figure 6: thin dashed = training error, bold = test error, the mean
    over seeds with their range shaded. The title says which of the paper's claims held."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    depths = result["config"]["depths"]
    colours = dict(zip(depths, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, residual, title in ((axes[0], False, "plain"), (axes[1], True, "ResNet")):
        for depth in depths:
            runs = [r for r in result["runs"] if r["residual"] == residual and r["depth"] == depth]
            if not runs:
                continue
            colour = colours[depth]
            epochs, train, _, _ = mean_curves(runs, "train_error")
            ax.plot(epochs, train, "--", color=colour, linewidth=1)
            epochs, test, low, high = mean_curves(runs, "test_error")
            ax.plot(epochs, test, "-", color=colour, linewidth=2.5, label=f"{title}-{depth}")
            if len(runs) > 1:
                ax.fill_between(epochs, low, high, color=colour, alpha=0.15, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{title} networks")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(title="bold: test, dashed: train")
    axes[0].set_ylabel("error (%)")
    title = figure_title(result)
    fig.suptitle(title, color="firebrick" if "NOT shown" in title else "black")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def time_step(
    config: DegradationConfig, precision: str, steps: int = 2, name: str | None = None
) -> float:
    """Seconds of one training step (forward, backward) of network ``name`` (default: the
    deepest ResNet of the config) on a random batch in ``precision``, after one untimed step:
    what ``--precision auto`` weighs bf16 against fp32 on, and what plans the epochs."""
    name = name or f"resnet{max(config.depths)}"
    model = create_model(name, in_channels=1, stem=config.stem)
    model.to(memory_format=memory_format(config.channels_last))
    x = torch.randn(config.batch_size, 1, 28, 28).contiguous(
        memory_format=memory_format(config.channels_last)
    )
    y = torch.randint(0, 10, (config.batch_size,))
    times = []
    for _ in range(steps + 1):
        started = now()
        with autocast(precision):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        times.append(now() - started)
    return min(times[1:])


# A study step runs slower than the bare timed step (augmentation, the optimizer, batch-norm
# updates, the per-epoch test pass): this margin on the timed steps keeps the planned epochs
# inside the budget, and the test pass counts a forward pass as a third of a step.
PLAN_MARGIN = 1.3
MOST_PLANNED_EPOCHS = 137  # the paper budget's: more than its 64k steps is never planned


def seconds_per_epoch(
    config: DegradationConfig, timed: Callable[[str], float] | None = None
) -> float:
    """Estimated wall seconds of one epoch of every network the study trains (each depth,
    plain and residual, each seed), from ``timed(name)``, one step's seconds (default:
    :func:`time_step` in the config's precision)."""
    timed = timed or (lambda name: time_step(config, config.precision, name=name))
    steps = -(-config.train_size // config.batch_size)
    steps += -(-config.test_size // config.batch_size) / 3
    names = [f"{kind}resnet{d}" for d in config.depths for kind in ("plain_", "")]
    return PLAN_MARGIN * config.seeds * steps * sum(timed(name) for name in names)


def plan_epochs(config: DegradationConfig, epoch_seconds: float) -> int:
    """The most epochs of ``epoch_seconds`` that fit the config's minutes, at least one."""
    return max(1, epochs_within(60 * config.minutes, epoch_seconds, MOST_PLANNED_EPOCHS))
