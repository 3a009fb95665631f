"""`reslab detect train` as a whole, from a :class:`~reslab.engine.detect_config.DetectConfig`:
the precision resolved once, the warm starts trained in one process, the ranks started, the
detector built and trained, and the val split scored.

The steps are separate functions so that the detection benchmark runs the same ones and adds
its own measurements between them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from reslab.data.coco import CocoDetection, eval_transforms, train_transforms
from reslab.engine.box_pretrain import (
    load_warm_start,
    pretrain_box_classifier,
    save_warm_start,
)
from reslab.engine.checkpoint import atomic_write, load_checkpoint
from reslab.engine.coco_eval import report_metrics
from reslab.engine.detect_config import (
    FLAG_FIELDS,
    DetectConfig,
    DetectTrainConfig,
    set_flags,
    validate,
)
from reslab.engine.detect_infer import evaluate_detector
from reslab.engine.detect_plan import chosen, data_line, make_plan, plan_table, warnings_for
from reslab.engine.detection import DetectionStep, train_detector
from reslab.engine.distributed import (
    World,
    check_batch,
    cpu_cores,
    in_launched_world,
    init_world,
    relaunch,
    set_threads,
    sum_over_ranks,
)
from reslab.engine.rescore import (
    load_rescorer_payload,
    rescorer_from_checkpoint,
    save_rescorer,
    train_rescorer,
)
from reslab.engine.runfolder import held_run
from reslab.errors import ReslabError
from reslab.models.detection import DetectorConfig, build_detector, load_backbone_weights
from reslab.precision import resolve_precision
from reslab.weights import FIRST_CONV, WeightsInfo, adapt_first_conv, read_weights


def detector_config(config: DetectConfig, dataset: CocoDetection) -> DetectorConfig:
    """The detector a run trains: its checkpoint's when resuming, else built for the data."""
    if config.resume:
        path = Path(config.out) / "last.pt"
        payload = load_checkpoint(path)
        if payload.get("task") != "detection":
            raise ReslabError(
                f"{path} holds a {payload.get('task', 'classification')} model "
                f"({payload['model']['name']}), not a detector; continue it with "
                f"`reslab train --resume {config.out}`, or give detect train another --out"
            )
        return DetectorConfig.from_dict(payload["model"]["kwargs"])
    return config.model.detector(dataset)


def build_model(config: DetectConfig, detector: DetectorConfig, console: Console):
    """The detector, seeded, with ``config.model.weights`` loaded when given for a new run."""
    torch.manual_seed(config.train.seed)
    model = build_detector(detector)
    if config.model.weights and not config.resume:
        state, info = backbone_weights(config.model.weights, detector.backbone)
        skipped = load_backbone_weights(model, state)
        console.print(f"loaded {info.source} into trunk and head (unused: {', '.join(skipped)})")
    return model


def backbone_weights(source: str, backbone: str) -> tuple[dict, WeightsInfo]:
    """The weights ``--backbone-weights`` names (:func:`reslab.weights.read_weights`:
    torchvision's ImageNet weights, a state dict or safetensors file, or a reslab run), the
    first convolution adapted to RGB where they were trained on another number of channels
    (a Fashion-MNIST run's grey images)."""
    state, info = read_weights(source, backbone)
    conv = state.get(FIRST_CONV)
    if conv is not None and conv.ndim == 4 and conv.shape[1] != 3:
        state[FIRST_CONV] = adapt_first_conv(conv, 3)
    return state, info


def step_seconds(config: DetectConfig, precision: str, world: World) -> float:
    """Seconds of one training step of ``config``'s detector in ``precision``, after an
    untimed one, on a throwaway copy; averaged over the processes so that all choose alike.
    The random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        dataset = config.data.dataset("train", train_transforms())
        model = build_model(config, detector_config(config, dataset), Console(quiet=True))
        model.train().to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=config.train.scaled_lr(), momentum=0.9)
        step = DetectionStep(model, optimizer, params, config.train.clip_grad_norm, precision)
        count = min(len(dataset), max(1, config.train.batch_size // world.size))
        batch = tuple(zip(*(dataset[i] for i in range(count)), strict=True))
        step.update(step.forward(batch))  # oneDNN builds its kernels on the first
        started = time.perf_counter()
        step.update(step.forward(batch))
        seconds = torch.tensor(time.perf_counter() - started, dtype=torch.float64)
    (total,) = sum_over_ranks(world, seconds)
    return total.item() / world.size


def resolve_train_precision(config: DetectConfig, console: Console, world: World) -> str:
    """``config.precision``, "auto" resolved by timing a training step in fp32 and in bf16
    where the CPU has native bf16 (:func:`reslab.precision.resolve_precision`)."""
    precision, _ = resolve_precision(
        config.precision,
        measure=lambda precision: step_seconds(config, precision, world),
        say=console.print,
        what="a training step",
    )
    return precision


def warm_starts(
    config: DetectConfig, precision: str, console: Console, on_rescorer=None, on_pretrained=None
) -> None:
    """The rescoring classifier, then the box-classifier pretraining, each trained here in one
    process with all its threads and saved in the run folder for the ranks to load.
    ``on_rescorer(rescorer, record)`` and ``on_pretrained(model, record)`` may add to a record
    before it is saved."""
    bf16 = precision == "bf16"
    if config.warm.rescore_minutes:
        rescorer, record = train_rescorer(
            config.data.dataset("train"),
            config.warm.rescore_minutes,
            seed=config.train.seed,
            bf16=bf16,
            console=console,
        )
        if on_rescorer is not None:
            on_rescorer(rescorer, record)
        save_rescorer(rescorer, config.out, record)
    if config.warm.pretrain_minutes:
        dataset = config.data.dataset("train")
        model = build_model(config, detector_config(config, dataset), console)
        record = pretrain_box_classifier(
            model,
            dataset,
            config.warm.pretrain_minutes,
            seed=config.train.seed,
            console=console,
            jitter=config.warm.pretrain_jitter,
            bf16=bf16,
        )
        if on_pretrained is not None:
            on_pretrained(model, record)
        save_warm_start(model, config.out, record)


@dataclass
class Prepared:
    """A rank's detector, data and recipe, ready for :func:`train_detector`."""

    model: torch.nn.Module
    dataset: CocoDetection
    detector: DetectorConfig
    train: DetectTrainConfig  # bf16 resolved; max_minutes: what the warm starts left
    rescorer: dict | None  # the rescoring classifier's payload
    pretrain: dict | None  # the pretraining's record


def prepare(config: DetectConfig, precision: str, console: Console) -> Prepared:
    """The detector built (and warm-started from the run folder) for the train split."""
    dataset = config.data.dataset("train", train_transforms())
    detector = detector_config(config, dataset)
    if detector.num_classes != dataset.num_classes:
        raise ReslabError(
            f"the checkpoint has {detector.num_classes - 1} classes, the data "
            f"{dataset.num_classes - 1}"
        )
    model = build_model(config, detector, console)
    max_minutes = config.train.max_minutes
    pretrain = rescorer = None
    if config.warm.pretrain_minutes:
        pretrain = load_warm_start(model, config.out)
        if max_minutes:  # the pretraining, crops' making included, came out of the budget
            max_minutes -= pretrain["seconds"] / 60
    if config.warm.rescore_minutes:
        rescorer = load_rescorer_payload(config.out)
        if max_minutes:  # so did the rescorer's training
            max_minutes -= rescorer["record"]["seconds"] / 60
    train = replace(config.train, bf16=precision == "bf16", max_minutes=max_minutes)
    return Prepared(model, dataset, detector, train, rescorer, pretrain)


def report_start(prepared: Prepared, world: World, console: Console) -> None:
    console.print(f"detector: {asdict(prepared.detector)}")
    dataset, train = prepared.dataset, prepared.train
    console.print(
        f"training: {asdict(train)}; {len(dataset)} images, {dataset.num_classes - 1} classes"
    )
    if world.active:
        console.print(
            f"processes: {world.size}; global batch {train.batch_size} "
            f"({train.batch_size // world.size} per process)"
        )


def relaunch_as(
    processes: int, argv: list[str] | None, threads: int, precision: str, plan: Path | None = None
):
    """:func:`~reslab.engine.distributed.relaunch`, the ranks told the precision this process
    resolved (``--precision``, in place of ``--bf16``), so that every rank computes in it
    without timing it again, and the plan it made (``--plan FILE``), so that every rank trains
    the same recipe; ``argv`` None: this process's own command line."""
    extra = ("--precision", precision, *(("--plan", str(plan)) if plan else ()))
    return relaunch(processes, argv, threads, drop=("--bf16",), extra=extra)


def plan_path(config: DetectConfig) -> Path:
    return Path(config.out) / "plan.json"


def planned(config: DetectConfig, console: Console) -> tuple[DetectConfig, str, dict | None]:
    """(the run's config, its precision, the plan's record or None): a plan file's or a
    resumed checkpoint's plan applied as it was made (less the flags given now), or, for a new run with the planned
    recipe, a plan made from the training set and one timed step and written to
    ``OUT/plan.json``. The precision is resolved here unless a plan was only applied."""
    record = None
    if config.plan.file:
        record = json.loads(Path(config.plan.file).read_text())
    elif config.resume:
        record = load_checkpoint(Path(config.out) / "last.pt").get("plan")
    if record is not None:  # the flags given now still win; a resumed run's warm starts are done
        values = chosen(config, record["values"])
        if config.resume:
            values = {k: v for k, v in values.items() if FLAG_FIELDS[k][0] != "warm"}
        return set_flags(config, values), config.precision, record
    if config.plan.recipe != "planned":
        return config, resolve_train_precision(config, console, World()), None
    dataset = config.data.dataset("train")
    for line in warnings_for(dataset):
        console.print(line)
    precision = config.precision

    def measure(draft: DetectConfig) -> float:
        nonlocal precision
        precision = resolve_train_precision(draft, console, World())
        return step_seconds(draft, precision, World())

    model = None
    if config.model.weights:  # the architecture they were made for, downloading nothing
        name = config.model.backbone if "backbone" in config.plan.explicit else "resnet18"
        model = read_weights(config.model.weights, name, tensors=False)[1].model
    config, record = make_plan(config, dataset, cpu_cores(), measure, model)
    console.print(data_line(record), soft_wrap=True)
    console.print(plan_table(record))
    path = plan_path(config)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return config, precision, record


def run_training(config: DetectConfig, argv: list[str] | None = None) -> int:
    """`reslab detect train`: ``argv`` is the command line the ranks repeat (None: this
    process's)."""
    validate(config)
    set_threads(config.threads, Console().print)
    precision, plan = config.precision, None
    if not in_launched_world():
        config, precision, plan = planned(config, Console())
        validate(config)
        warm_starts(config, precision, Console())
    elif config.plan.file:
        config, precision, plan = planned(config, Console(quiet=True))
    processes = config.processes or cpu_cores()
    if processes > 1 and not in_launched_world():
        check_batch(World(size=processes), config.train.batch_size)
        return relaunch_as(processes, argv, config.threads, precision, plan and plan_path(config))
    world = init_world()
    console = Console() if world.is_main else Console(quiet=True)
    if precision == "auto":  # ranks that torchrun started time it together
        precision = resolve_train_precision(config, console, world)
    with held_run(Path(config.out) if world.is_main else None, console.print):
        return train_held(config, precision, plan, world, console)


def train_held(config: DetectConfig, precision: str, plan, world, console: Console) -> int:
    """:func:`run_training` in its held run folder: prepare, train, evaluate."""
    prepared = prepare(config, precision, console)
    report_start(prepared, world, console)
    losses = train_detector(
        prepared.model,
        prepared.dataset,
        prepared.train,
        config.out,
        resume=config.resume,
        console=console,
        world=world,
        rescorer=prepared.rescorer,
        plan=plan,
    )
    console.print("last step: " + ", ".join(f"{k}={v:.4f}" for k, v in losses.items()))
    checkpoint = Path(config.out) / "last.pt"
    console.print(f"checkpoint: {checkpoint}")
    if config.data.has_val and world.is_main:
        metrics = evaluate_detector(
            prepared.model,
            config.data.dataset("val", eval_transforms()),
            prepared.train.batch_size,
            prepared.train.precision,
            rescorer=rescorer_from_checkpoint(load_checkpoint(checkpoint)),
        )
        report_metrics(console, metrics, "val")
    return 0
