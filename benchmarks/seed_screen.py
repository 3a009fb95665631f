"""Many seeds of one Fashion-MNIST training recipe at once: grouped copies of its model.

    python benchmarks/seed_screen.py --copies 8 --device cuda --set widths=64,192,384,768
    python benchmarks/seed_screen.py --copies 8 --device cuda --set epochs=44 --note "..."

A recipe change worth 0.1 point is smaller than the spread of one recipe over seeds (about 0.1
point of test accuracy for `best`: benchmarks/results/seed_screen-20261204-gpu-prototype.json),
so one run per variant decides nothing. This screen trains N copies of `reslab train --preset P
[flags]`'s model as one grouped network (reslab.models.grouped), on the engine's loop: each
copy has its own initial weights (seed S + i), its own batch order, crops and flips, and its
own SGD step and EMA, all as the preset does, so the N final accuracies are N seeds of the
recipe, trained in one pass. At the end each copy is unpacked and scored on all 10,000 test
images by `reslab.engine.evaluate` with the preset's test-time views, as a run scores its last
epoch.

Not the CPU path: batches are drawn per copy, not as `reslab train` draws them, and the
precision is the GPU's; what a variant gains here is evidence for a CPU run, not a CPU result.
Time budgets (--max-minutes) do not apply: every copy runs the config's epochs. Writes
benchmarks/results/seed_screen-<time>.json with the machine, the config and every copy's
accuracies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F

from reslab.bench import machine_info
from reslab.data.sources import fashion_mnist_source, train_order
from reslab.data.transforms import augment, to_input
from reslab.engine.budget import now
from reslab.engine.config import (
    MODEL_KEYS,
    PRESETS,
    TrainConfig,
    add_set_argument,
    config_from_flags,
    parse_overrides,
)
from reslab.engine.ema import UpdateEma, make_ema
from reslab.engine.evaluate import evaluate
from reslab.engine.loop import Hook, Loop, run
from reslab.engine.schedules import Schedule, lr_factor
from reslab.engine.train import epoch_generator, input_spec, make_optimizer, steps_per_epoch
from reslab.errors import ReslabError
from reslab.fast import autocast
from reslab.models import create_model
from reslab.models.grouped import pack, unpack

RESULTS = Path(__file__).parent / "results"


def screen_config(preset: str, overrides: dict) -> TrainConfig:
    """The config `reslab train --preset P` with these overrides would run."""
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)} - set(MODEL_KEYS))
    if unknown:
        raise ReslabError(f"--set: no config field named {', '.join(unknown)}")
    config, _, _ = config_from_flags(preset, overrides)
    unsupported = {"data": None, "cutmix": 0.0, "sam": 0.0, "clean_epochs": 0, "resume": None}
    for key, off in unsupported.items():
        if getattr(config, key) != off:
            raise ReslabError(
                f"the seed screen does not support {key} (got {getattr(config, key)})"
            )
    return config


def batch_of_copies(images, labels, spec, config, orders, k, draws) -> tuple:
    """Step ``k``'s input (B, copies * C, H, W) and labels (B, copies) from the training set
    held on the device: copy i's batch from its own order, all augmented with the preset's crop
    and flip (one draw per image and copy)."""
    index = torch.stack([order[k] for order in orders]).to(images.device)  # (copies, B)
    copies, batch = index.shape
    x = to_input(images[index.flatten()], spec)  # (copies * B, C, H, W)
    if config.augment:
        x = augment(x, config.crop_padding, config.erasing, draws, spec.black())
    x = x.view(copies, batch, *x.shape[1:]).transpose(0, 1).flatten(1, 2)  # (B, copies * C, ...)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels[index].t()


def score(ema_or_model, source, spec, config, shift: int) -> list[float]:
    """Each copy's test accuracy, scored on its own by reslab's evaluation (unpacked)."""
    device = next(ema_or_model.parameters()).device
    out = []
    for model in unpack(ema_or_model):
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        evaluation = evaluate(
            model,
            source.test_batches(config.eval_batch_size),
            spec,
            len(source.classes),
            config.precision,
            config.channels_last,
            config.tta,
            shift,
        )
        out.append(evaluation.accuracy)
    return out


class CopyBatches:
    """The loop's batches: an epoch's steps, each copy's batch drawn from its own order
    (:func:`batch_of_copies`), from the training set held on ``device``."""

    def __init__(self, source, spec, config: TrainConfig, copies: int, device: torch.device):
        # the whole uint8 training set on the device once (47 MB), not a batch copied every step
        self.images = source.train_images.to(device)
        self.labels = source.train_labels.to(device)
        self.size, self.steps = source.train_size, steps_per_epoch(config, source)
        self.spec, self.config, self.copies = spec, config, copies

    def __call__(self, loop: Loop):
        epoch, seed, batch_size = loop.epoch + 1, self.config.seed, self.config.batch_size
        orders = [
            train_order(self.size, batch_size, epoch_generator(seed + i, epoch, 0))
            for i in range(self.copies)
        ]
        draws = epoch_generator(seed, epoch, 1)
        for k in range(self.steps):
            yield batch_of_copies(
                self.images, self.labels, self.spec, self.config, orders, k, draws
            )


class GroupedStep:
    """A step of the grouped copies: the mean of their cross-entropies (``"loss"``) and one
    optimizer step on their sum, so that each copy's gradient is its own mean loss's."""

    def __init__(self, network, optimizer, config: TrainConfig, copies: int, device):
        self.network, self.optimizer, self.config = network, optimizer, config
        self.copies, self.device = copies, device

    def forward(self, batch) -> dict[str, torch.Tensor]:
        x, targets = batch
        with autocast(self.config.precision, self.device):
            out = self.network(x).float()  # (B, copies, classes)
        loss = F.cross_entropy(
            out.flatten(0, 1), targets.flatten(), label_smoothing=self.config.label_smoothing
        )
        return {"loss": loss}

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        (losses["loss"] * self.copies).backward()
        self.optimizer.step()


class EpochRecord(Hook):
    """Per epoch: the mean training loss over its ``steps``, every copy's scores
    (:func:`score`) of ``scored`` every ``eval_every`` epochs and after the last, and the
    seconds since the run started; printed and kept in ``history``."""

    def __init__(self, scored, source, spec, config: TrainConfig, steps: int, eval_every: int):
        self.scored, self.source, self.spec = scored, source, spec
        self.config, self.steps, self.eval_every = config, steps, eval_every
        self.history: list[dict] = []
        self.started, self.loss_sum = 0.0, torch.zeros(())

    def before_run(self, loop: Loop) -> None:
        self.started = now()

    def before_epoch(self, loop: Loop) -> None:
        self.loss_sum = torch.zeros((), device=self.config.device)

    def after_step(self, loop: Loop) -> None:
        self.loss_sum += loop.losses["loss"].detach()

    def after_epoch(self, loop: Loop) -> None:
        epoch, last = loop.epoch, loop.epoch == loop.epochs
        record = {"epoch": epoch, "train_loss": self.loss_sum.item() / self.steps}
        if last or epoch % self.eval_every == 0:
            record["mirror"] = score(self.scored, self.source, self.spec, self.config, 0)
            if last and self.config.tta_shift:
                shift = self.config.tta_shift
                record["views"] = score(self.scored, self.source, self.spec, self.config, shift)
        record["elapsed_s"] = now() - self.started
        self.history.append(record)
        accuracies = record.get("views", record.get("mirror"))
        summary = (
            f" mean test accuracy {100 * statistics.fmean(accuracies):.2f}%" if accuracies else ""
        )
        print(
            f"epoch {epoch}/{loop.epochs} train loss {record['train_loss']:.4f}{summary} "
            f"elapsed {record['elapsed_s']:.0f}s",
            flush=True,
        )


def screen(config: TrainConfig, copies: int, eval_every: int) -> dict:
    """Train ``copies`` seeds of ``config`` as one grouped network; the record of the run."""
    device = torch.device(config.device)
    source = fashion_mnist_source(config.data_dir, verify=config.verify)
    spec = input_spec(config, source)
    kwargs = {**config.model_kwargs, "in_channels": source.channels}
    models = []
    for i in range(copies):
        torch.manual_seed(config.seed + i)
        models.append(create_model(config.model, num_classes=len(source.classes), **kwargs))
    network = pack(models).to(device)
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    ema = make_ema(network, config.ema)
    optimizer = make_optimizer(config, network)
    batches = CopyBatches(source, spec, config, copies, device)
    total = config.epochs * batches.steps
    scored = network if ema is None else ema.module
    record = EpochRecord(scored, source, spec, config, batches.steps, eval_every)
    hooks = [
        Schedule(
            optimizer, lambda loop: lr_factor(config.schedule, loop.step, total, config.warmup)
        ),
        *([] if ema is None else [UpdateEma(ema, network)]),
        record,
    ]
    step = GroupedStep(network, optimizer, config, copies, device)
    run(Loop(epochs=config.epochs), batches, step, hooks)
    last = record.history[-1]
    final = last.get("views", last["mirror"])
    return {
        "config": config.to_dict(),
        "copies": copies,
        "seeds": [config.seed + i for i in range(copies)],
        "test_accuracy": final,
        "mean": statistics.fmean(final),
        "stdev": statistics.stdev(final) if copies > 1 else math.nan,
        "mirror_mean": statistics.fmean(last["mirror"]),
        "seconds": now() - record.started,
        "history": record.history,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="best", choices=sorted(PRESETS))
    parser.add_argument("--copies", type=int, default=8, help="seeds trained at once (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="bf16",
        help="the copies' autocast (default bf16, what the presets' auto picks where it pays)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=8,
        metavar="E",
        help="mirror-only scores every E epochs (default 8; the last epoch always)",
    )
    add_set_argument(parser, "epochs=44 widths=64,192,384,768")
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/...)")
    parser.add_argument("--note", default="", help="free text saved with the results")
    args = parser.parse_args(argv)
    if args.copies < 1 or args.eval_every < 1:
        parser.error("--copies and --eval-every take a whole number of at least 1")
    try:
        overrides = parse_overrides(args.set)
        overrides.update(device=args.device, precision=args.precision)
        config = screen_config(args.preset, overrides)
        result = screen(config, args.copies, args.eval_every)
    except ReslabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or RESULTS / f"seed_screen-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_info(), "note": args.note, "preset": args.preset, **result}
    out.write_text(json.dumps(record, indent=1) + "\n")
    accuracies = ", ".join(f"{100 * a:.2f}" for a in result["test_accuracy"])
    print(
        f"{args.copies} seeds: mean {100 * result['mean']:.2f}% (sd {100 * result['stdev']:.2f}; "
        f"{accuracies}); mirror alone {100 * result['mirror_mean']:.2f}%; "
        f"{result['seconds'] / 60:.1f} min on {record['machine']['gpu'] or 'the CPU'}; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
