"""Shortcut variants and activation orderings (He et al. 2016, "Identity Mappings in Deep
Residual Networks", Table 1 / Figure 2 and Table 2 / Figure 4) on Fashion-MNIST.

Every variant is the same CIFAR network with one block option changed (``merge``,
``shortcut`` or ``ordering`` of :func:`reslab.models.create_model`), trained with one recipe
(:func:`reslab.analysis.degradation.train_network`). The paper's finding: the identity
shortcut beats every shortcut that scales, gates, convolves or drops, and full
pre-activation beats the other orderings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from reslab.analysis.degradation import DegradationConfig, prepared_sets, train_network
from reslab.engine.loop import NonFiniteLoss
from reslab.engine.plots import pyplot

SOURCE = 'He et al. 2016, "Identity Mappings in Deep Residual Networks", ResNet-110, CIFAR-10'
# variant -> (create_model kwargs, the paper's test error in %, None where it reports "fail")
SHORTCUTS: dict[str, tuple[dict, float | None]] = {
    "identity": ({}, 6.61),  # Table 1, "original"
    "scale_0.5": ({"merge": "scale"}, 12.35),  # 0.5 on the shortcut and on F
    "exclusive_gate": ({"merge": "exclusive_gate"}, 8.70),  # gate bias starting at -6
    "shortcut_gate": ({"merge": "shortcut_gate"}, 6.91),  # gate bias starting at -6
    "conv_1x1": ({"shortcut": "C"}, 12.22),
    "dropout": ({"merge": "dropout"}, None),  # ratio 0.5
}
ORDERINGS: dict[str, tuple[dict, float | None]] = {  # Table 2
    "original": ({}, 6.61),
    "bn_after_add": ({"ordering": "bn_after_add"}, 8.17),
    "relu_before_add": ({"ordering": "relu_before_add"}, 7.84),
    "relu_preact": ({"ordering": "relu_preact"}, 6.71),
    "full_preact": ({"ordering": "full_preact"}, 6.37),
}
GROUPS = {"shortcuts": SHORTCUTS, "orderings": ORDERINGS}
# what the paper finds best in each group
PAPER_BEST = {"shortcuts": "identity", "orderings": "full_preact"}
# the study's budget: fields of DegradationConfig; about 40 minutes of one idle core
# (benchmarks/study_time.py)
DEFAULT = dict(
    depths=(20, 32, 56),
    epochs=3,
    train_size=10_000,
    test_size=2000,
    pad=2,
    stem="small",
    channels_last=True,
)


def variant_runs(config: DegradationConfig, train_set, test_set, on_epoch=None) -> list[dict]:
    """Each variant of each group at each depth and seed; the identity and the original
    ordering are one network, trained once."""
    runs, trained = [], {}
    for depth in config.depths:
        for group, variants in GROUPS.items():
            for variant, (kwargs, _) in variants.items():
                for seed in range(config.seed, config.seed + config.seeds):
                    key = (depth, tuple(sorted(kwargs.items())), seed)
                    if key not in trained:
                        report = relabelled(on_epoch, variant)
                        trained[key] = train_or_fail(
                            f"resnet{depth}",
                            replace(config, seed=seed),
                            train_set,
                            test_set,
                            report,
                            kwargs,
                        )
                    runs.append(
                        {
                            "group": group,
                            "variant": variant,
                            "depth": depth,
                            "seed": seed,
                            **trained[key],
                        }
                    )
    return runs


def relabelled(on_epoch, variant: str):
    """``on_epoch`` with the variant's name after the network's."""
    if on_epoch is None:
        return None
    return lambda name, row: on_epoch(f"{name} {variant}", row)


def train_or_fail(name, config, train_set, test_set, on_epoch, kwargs) -> dict:
    """A run record; a run whose loss became NaN or infinite is recorded as failed, as the
    paper's Table 1 marks its diverging variants "fail"."""
    try:
        _, record = train_network(name, config, train_set, test_set, on_epoch, **kwargs)
    except NonFiniteLoss as error:
        return {"failed": str(error), "history": [], "params": None}
    return {**record, "failed": None}


def shortcut_study(
    config: DegradationConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    on_epoch: Callable[[str, dict], None] | None = None,
) -> dict:
    """Train every variant on uint8 ``(images, labels)``; runs, table rows and the reading."""
    config.check(min_depths=1)
    train_set, test_set = prepared_sets(config, train, test)
    runs = variant_runs(config, train_set, test_set, on_epoch)
    result = {
        "config": {**asdict(config), "depths": list(config.depths)},
        "train_size": len(train_set[1]),
        "test_size": len(test_set[1]),
        "source": SOURCE,
        "runs": runs,
    }
    result["rows"] = variant_rows(result)
    result["orderings_found"] = orderings_found(result["rows"])
    return result


def variant_rows(result: dict) -> list[dict]:
    """One row per group, variant and depth: the mean final errors over the seeds (None where
    a seed failed) and the paper's error."""
    rows = []
    for group, variants in GROUPS.items():
        for depth in result["config"]["depths"]:
            for variant, (_, paper) in variants.items():
                runs = [
                    r
                    for r in result["runs"]
                    if (r["group"], r["variant"], r["depth"]) == (group, variant, depth)
                ]
                failed = any(r["failed"] for r in runs)
                ends = [] if failed else [r["history"][-1] for r in runs]
                rows.append(
                    {
                        "group": group,
                        "variant": variant,
                        "depth": depth,
                        "seeds": len(runs),
                        "failed": failed,
                        "train_error": mean_of(ends, "train_error"),
                        "test_error": mean_of(ends, "test_error"),
                        "paper_error": None if paper is None else paper / 100,
                    }
                )
    return rows


def mean_of(rows: list[dict], key: str) -> float | None:
    return sum(r[key] for r in rows) / len(rows) if rows else None


def rank(rows: list[dict], key: str) -> list[str]:
    """Variant names by ``key``, lowest first; failed ones (None) last."""
    ordered = sorted(rows, key=lambda r: (r[key] is None, r[key] or 0.0))
    return [r["variant"] for r in ordered]


def orderings_found(rows: list[dict]) -> list[dict]:
    """Per group and depth: the variants ranked by measured test error and by the paper's, and
    whether the paper's best is best here too."""
    found = []
    for group in GROUPS:
        for depth in sorted({r["depth"] for r in rows}):
            these = [r for r in rows if r["group"] == group and r["depth"] == depth]
            measured, paper = rank(these, "test_error"), rank(these, "paper_error")
            found.append(
                {
                    "group": group,
                    "depth": depth,
                    "measured": measured,
                    "paper": paper,
                    "paper_best": PAPER_BEST[group],
                    "paper_best_holds": measured[0] == PAPER_BEST[group],
                }
            )
    return found


def plot_shortcuts(result: dict, path: str | Path) -> Path:
    """Final test error per variant, one bar per depth, the paper's error as a black tick."""
    plt = pyplot()
    depths = result["config"]["depths"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    width = 0.8 / len(depths)
    for ax, (group, variants) in zip(axes, GROUPS.items(), strict=True):
        names = list(variants)
        for d, depth in enumerate(depths):
            rows = {
                r["variant"]: r
                for r in result["rows"]
                if r["group"] == group and r["depth"] == depth
            }
            values = [100 * (rows[n]["test_error"] or 0) for n in names]
            xs = [i + (d - (len(depths) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, values, width, label=f"ResNet-{depth}")
            for x, n in zip(xs, names, strict=True):
                if rows[n]["failed"]:
                    ax.text(x, 1, "fail", rotation=90, ha="center", va="bottom", fontsize=7)
        paper = [variants[n][1] for n in names]
        ax.scatter(
            range(len(names)),
            [p if p is not None else float("nan") for p in paper],
            marker="_",
            s=300,
            color="black",
            label="paper, ResNet-110 CIFAR-10",
        )
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(group)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final test error (%)")
    c = result["config"]
    fig.suptitle(
        f"Fashion-MNIST, {result['train_size']:,} training images, {c['epochs']} epochs, "
        f"{c['seeds']} seed(s); paper: {SOURCE}",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
