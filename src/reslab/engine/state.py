"""A classification run's state: the data it reads, the model, its average and optimizer,
the run folder, and how a checkpoint is made from it and restored into it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.optim.swa_utils import AveragedModel

from reslab.data.folders import DEFAULT_SIZE, FolderSource
from reslab.data.sources import Source, fashion_mnist_source
from reslab.data.transforms import InputSpec
from reslab.engine.checkpoint import (
    atomic_write,
    load_checkpoint,
    make_payload,
    require_classifier,
    save_checkpoint,
)
from reslab.engine.config import TrainConfig, validate
from reslab.engine.distributed import World, check_batch, set_threads
from reslab.engine.ema import make_ema, restore_ema
from reslab.engine.evaluate import Evaluation
from reslab.engine.loop import Hook, Loop
from reslab.engine.runfolder import is_bookkeeping
from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.precision import bf16_supported
from reslab.weights import WeightsInfo, fit_weights, read_weights


def open_source(config: TrainConfig) -> Source:
    if config.data is None:
        return fashion_mnist_source(config.data_dir, verify=config.verify)
    return FolderSource(
        config.data,
        size=config.image_size or DEFAULT_SIZE,
        val_fraction=config.val_fraction,
        seed=config.seed,
        workers=config.workers,
        strict=config.strict,
        resize=config.resize,
        whole_train=config.augment and config.crop == "resized",
    )


def say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def prepare(config: TrainConfig, world, console: Console) -> Source:
    """Check the config, set up the device and threads, seed, and open the data."""
    validate(config)
    check_batch(world, config.batch_size)
    set_threads(config.threads, lambda text: say(console, text))
    if config.device != "cpu":
        # fp32 on a GPU as on the CPU: no TF32 rounding of convolution and matmul inputs
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        say(console, f"device: {config.device} ({torch.cuda.get_device_name(config.device)})")
    torch.manual_seed(config.seed)
    source = open_source(config)
    if config.precision == "bf16" and not bf16_supported():
        say(
            console,
            "warning: this CPU has no native bf16 (AVX512-BF16 or AMX); bf16 convolutions fall "
            "back to PyTorch's reference kernels, several times slower than --precision fp32",
        )
    say(console, f"data: {source.description}")
    if config.batch_size > source.train_size:
        say(
            console,
            f"note: --batch-size {config.batch_size} is more than the {source.train_size:,} "
            "training images; each epoch is one step over all of them",
        )
    if world.active:
        say(
            console,
            f"processes: {world.size}; global batch {config.batch_size} "
            f"({config.batch_size // world.size} per process); sync batch norm "
            f"{'on' if config.sync_bn else 'off'}",
        )
    return source


def input_spec(
    config: TrainConfig, source: Source, weights: WeightsInfo | None = None
) -> InputSpec:
    """How the run's images become model input; pretrained ``weights`` bring the mean and
    std they were trained with (averaged over channels when the data has fewer)."""
    channels = source.channels
    mean, std = tuple(source.mean), tuple(source.std)
    if weights is not None:
        mean, std = (per_channel(values, channels) for values in (weights.mean, weights.std))
    return InputSpec(
        size=config.image_size or source.size,
        source_size=source.size,
        channels=channels,
        mean=mean if config.normalize else (0.0,) * channels,
        std=std if config.normalize else (1.0,) * channels,
        stem=config.model_kwargs.get("stem", "registry default"),
        resize=getattr(source, "resize", 0),
    )


def per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """A statistic per channel for ``channels`` inputs: as it is, repeated from one channel,
    or averaged for one channel from several."""
    if len(values) == channels:
        return tuple(values)
    if len(values) == 1:
        return tuple(values) * channels
    return (sum(values) / len(values),) * channels


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """Independent, reproducible random streams per (seed, epoch): 0 = order, 1 = augment."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 2 + stream)


def steps_per_epoch(config: TrainConfig, source: Source) -> int:
    return max(source.train_size // config.batch_size, 1)


def model_parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The model's named parameters by part, from input to output: ``stem`` (all before the
    first stage), each stage (``layer1`` ...), ``head`` (the classifier ``fc``). A
    pre-activation network's last norm goes with the last stage."""
    stages = list(model.stage_names)
    parts: dict[str, list] = {name: [] for name in ("stem", *stages, "head")}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        part = "head" if top == "fc" else top if top in stages else "stem"
        parts[stages[-1] if top == "final_norm" else part].append((name, param))
    return parts


def part_rates(config: TrainConfig, count: int) -> list[float]:
    """Peak rates of ``count`` parts from input to output: a geometric slice from
    ``lr / lr_spread`` to ``lr`` (fastai's ``slice(lr / 100, lr)``)."""
    if count == 1:
        return [config.lr]
    return [config.lr * config.lr_spread ** ((i - count + 1) / (count - 1)) for i in range(count)]


def parameter_groups(config: TrainConfig, model: nn.Module) -> list[dict]:
    """The optimizer's groups. No weight decay on batch-norm parameters and biases ("Bag of
    Tricks", He et al. 2019, section 3.1): decaying them only shrinks the scale that the next
    layer undoes. With ``lr_spread`` each part (:func:`model_parts`) has its own two groups,
    at its rate of :func:`part_rates` (``base_lr``)."""
    if config.lr_spread == 1:
        parts = {"all": list(model.named_parameters())}
        rates = [config.lr]
    else:
        parts = model_parts(model)
        rates = part_rates(config, len(parts))
    groups = []
    for (part, named), rate in zip(parts.items(), rates, strict=True):
        extra = {} if part == "all" else {"part": part, "lr": rate, "base_lr": rate}
        for decay in (True, False):
            params = [p for _, p in named if (p.ndim > 1) == decay]
            weight_decay = config.weight_decay if decay else 0.0
            if params or part == "all":
                groups.append({"params": params, "weight_decay": weight_decay, **extra})
    return groups


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(config, model)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=config.lr)


@dataclass
class TrainState:
    """Everything that changes during a classification run; checkpoints are made from it.
    ``loop`` is the skeleton's position (steps, epochs, the stop flag)."""

    config: TrainConfig
    model: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    run_dir: Path
    classes: tuple[str, ...]
    spec: InputSpec
    loop: Loop = field(default_factory=Loop)
    best_accuracy: float = -1.0
    history: list[dict] = field(default_factory=list)
    train_model: nn.Module | None = None  # the module stepped: DDP around model, or model
    # mid-epoch position: the current epoch's augmentation generator and running sums; saved
    # so that a resumed run takes the very same next step
    draws: torch.Generator | None = None
    sums: tuple[float, int, int] = (0.0, 0, 0)
    resume_progress: dict | None = None
    weights: dict | None = None  # the pretrained weights' WeightsInfo.to_dict(), if any

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def world(self) -> World:
        return self.loop.world

    @world.setter
    def world(self, world: World) -> None:
        self.loop.world = world

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def epoch(self) -> int:
        return self.loop.epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.loop.batch_in_epoch

    @property
    def stop(self) -> bool:
        return self.loop.stop

    @stop.setter
    def stop(self, value: bool) -> None:
        self.loop.stop = value


def read_pretrained(config: TrainConfig, console: Console | None) -> tuple[dict, WeightsInfo]:
    """The weights ``config.weights`` names, and their info."""
    tensors, info = read_weights(config.weights, config.model)
    if console is not None:
        say(console, f"weights: {info.source}")
    return tensors, info


def build_state(
    config: TrainConfig,
    source: Source,
    run_dir: Path,
    console: Console | None = None,
    pretrained: bool = False,
) -> TrainState:
    """A fresh run's state; with ``pretrained`` the weights ``config.weights`` names, if any,
    are fitted into the model before the average and the optimizer are made from it. Callers
    make the run folder after this, so that weights that do not fit leave none behind."""
    kwargs = {**config.model_kwargs, "in_channels": source.channels}
    kwargs["num_classes"] = len(source.classes)
    model = create_model(config.model, **kwargs)
    info = None
    if pretrained and config.weights:
        tensors, info = read_pretrained(config, console)
        report = (lambda text: say(console, text)) if console is not None else None
        fit_weights(model, tensors, info, report, source.classes)
    model = model.to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return TrainState(
        config,
        model,
        make_ema(model, config.ema),
        make_optimizer(config, model),
        run_dir,
        source.classes,
        input_spec(config, source, info),
        loop=Loop(epochs=config.epochs),
        weights=info.to_dict() if info is not None else None,
    )


def checkpoint_payload(state: TrainState, evaluation: Evaluation | None) -> dict:
    extra = {
        "optimizer": state.optimizer.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "rng": {"torch": torch.get_rng_state()},
        "config": state.config.to_dict(),
        "classes": list(state.classes),
        "input": state.spec.to_dict(),
        "weights": state.weights,
        "best_accuracy": state.best_accuracy,
        "test_accuracy": evaluation.accuracy if evaluation else None,
        "progress": None,
    }
    if 0 < state.batch_in_epoch and evaluation is None:
        extra["progress"] = {
            "batches": state.batch_in_epoch,
            "draws": state.draws.get_state(),
            "loss_sum": state.sums[0],
            "correct": state.sums[1],
            "seen": state.sums[2],
        }
    if state.ema is not None:
        # "state_dict" holds the averaged weights that eval and predict use; resuming also
        # needs the raw ones the optimizer moves
        extra["train_state_dict"] = state.model.state_dict()
    return make_payload(state.eval_model, "classification", **extra)


def restore(state: TrainState, payload: dict) -> list[int]:
    """Put ``payload``'s training state into ``state``; returns the epochs whose records
    ``metrics.jsonl`` held beyond the checkpoint's, which rank 0 drops from the file, since
    the run trains them again (a history never holds an epoch twice)."""
    state.model.load_state_dict(payload.get("train_state_dict", payload["state_dict"]))
    if state.ema is not None:
        restore_ema(state.ema, payload["state_dict"], payload["step"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.loop.epoch, state.loop.step = payload["epoch"], payload["step"]
    state.best_accuracy = payload["best_accuracy"]
    state.weights = payload.get("weights")
    torch.set_rng_state(payload["rng"]["torch"])
    state.resume_progress = payload.get("progress")
    if state.resume_progress is not None:
        state.loop.batch_in_epoch = state.resume_progress["batches"]
    metrics = state.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    state.history = [r for r in records if r["epoch"] <= state.epoch]
    dropped = [r["epoch"] for r in records if r["epoch"] > state.epoch]
    if dropped and state.world.is_main:
        text = "".join(json.dumps(r) + "\n" for r in state.history)
        atomic_write(metrics, lambda f: f.write(text.encode()))
    return dropped


def resume_config(
    path: str, epochs: int | None = None, device: str | None = None
) -> tuple[TrainConfig, dict, Path]:
    """The saved config of a run (``epochs`` may be raised, ``device`` changed), its
    checkpoint and its folder."""
    run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    if Path(path).is_dir() and not (run_dir / "last.pt").is_file():
        raise ReslabError(missing_last(run_dir))
    payload = load_checkpoint(path)
    require_classifier(
        payload,
        f"continue it with `reslab detect train --resume --out {run_dir}` and its data flags",
    )
    if "config" not in payload or "optimizer" not in payload:
        raise ReslabError(f"{path} holds weights only (no training state); cannot resume")
    config = TrainConfig.from_dict(payload["config"])
    config.resume = str(path)
    if epochs is not None:
        config.epochs = epochs
    if device is not None:
        config.device = device
    validate(config)
    if payload["epoch"] >= config.epochs:
        raise ReslabError(
            f"{path} already finished epoch {payload['epoch']} of {config.epochs}; "
            "pass a larger --epochs to train on"
        )
    return config, payload, run_dir


def missing_last(run_dir: Path) -> str:
    """Why a folder without last.pt does not resume by itself: its best.pt (if any) is an
    older state, from which going on would train later epochs again."""
    best = run_dir / "best.pt"
    if not best.is_file():
        return f"{run_dir} has no last.pt to resume from (nor a best.pt)"
    epoch = load_checkpoint(best).get("epoch", "?")
    return (
        f"{run_dir} has no last.pt, the run's latest state; best.pt is from epoch {epoch}. To "
        f"go back to it and train the later epochs again, pass --resume {best}"
    )


def _fresh_folder(path: Path, force: bool) -> Path:
    if path.is_dir() and not force and any(not is_bookkeeping(p) for p in path.iterdir()):
        raise ReslabError(f"run folder {path} exists and is not empty; pass --force to reuse it")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / ".write-test").touch()
        (path / ".write-test").unlink()
    except OSError as error:
        raise ReslabError(
            f"cannot write the run folder {path} ({error.strerror or error}); "
            "pass --out with a writable folder"
        ) from None
    return path


def new_run_dir(config: TrainConfig) -> Path:
    """``--out`` as given (refused if it has files, unless --force), else
    runs/<date>-<model> with -2, -3, ... appended when taken."""
    if config.out is not None:
        return _fresh_folder(Path(config.out), config.force)
    base = Path("runs") / f"{date.today().isoformat()}-{config.model}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as error:
            raise ReslabError(
                f"cannot create the run folder {path} ({error.strerror or error}); "
                "pass --out with a writable folder"
            ) from None


def write_config(config: TrainConfig, run_dir: Path) -> None:
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def describe(config: TrainConfig) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in config.to_dict().items())


class SaveEvery(Hook):
    """``--save-every N``: last.pt every N steps as well (rank 0), unless the run is stopping,
    which saves anyway."""

    def __init__(self, state: TrainState, steps: int):
        self.state, self.steps = state, steps

    def after_step(self, loop: Loop) -> None:
        if self.steps and loop.step % self.steps == 0 and not loop.stop and loop.world.is_main:
            save_checkpoint(self.state.run_dir / "last.pt", checkpoint_payload(self.state, None))


class SaveStopped(Hook):
    """A run stopped mid-epoch (a signal, a hook) keeps its step count and weights in
    last.pt, with the epoch's position, not a claim that the epoch finished."""

    def __init__(self, state: TrainState):
        self.state = state

    def after_run(self, loop: Loop) -> None:
        if loop.stop and loop.batch_in_epoch and loop.world.is_main:
            save_checkpoint(self.state.run_dir / "last.pt", checkpoint_payload(self.state, None))
