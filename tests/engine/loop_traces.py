"""Per-step traces of reslab's training loops, taken from outside them, for the golden file.

Every loop is run through its public entry point on tiny synthetic data, seeded, in fp32, on one
thread. torch's global optimizer hooks see each step whatever loop takes it: the pre-hook records
each param group's learning rate and the global gradient norm (a loss proxy every loop has); the
losses a loop writes itself and a sha256 of the weights it returns or saves come from its
outputs. Nothing here reaches into a loop's internals, so the traces stay comparable when the
loops are rewritten.

``tests/golden/traces.json`` holds the traces recorded from the code before the loops were moved
onto one engine, with the machine that recorded them. To record them again (only for a change
meant to move the numbers; say so in the commit):

    .venv/bin/python tests/golden/record_traces.py

Not a test module: the tests and the recording script load it by path (pytest runs with
``--import-mode=importlib``, where test folders are not packages).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

TESTS = Path(__file__).parents[1]
GOLDEN = TESTS / "golden" / "traces.json"
# the synthetic Fashion-MNIST of tests/conftest.py: 40 training images, 5 steps of 8 an epoch
STEPS_PER_EPOCH = 5


def load_by_path(name: str, path: Path):
    """A module from a file, registered under ``name`` (once)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def quiet() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


class Crash(Exception):
    """Raised from an optimizer pre-hook: the run dies before that step, as if killed."""


class StepRecorder:
    """Within ``with``: every optimizer step's param-group rates and global gradient norm.

    ``crash_before=k`` raises :class:`Crash` when step ``k`` (counted from 1 within this
    recorder) is about to be taken; ``after_step`` callbacks run after each step with the
    optimizer.
    """

    def __init__(self, crash_before: int = 0, after_step: tuple[Callable, ...] = ()):
        self.lr: list[list[float]] = []
        self.grad_norm: list[float] = []
        self.crash_before = crash_before
        self.after_step = after_step
        self.optimizer: torch.optim.Optimizer | None = None

    def __enter__(self) -> StepRecorder:
        self.handles = [
            register_optimizer_step_pre_hook(self.pre),
            register_optimizer_step_post_hook(self.post),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def pre(self, optimizer, args, kwargs) -> None:
        if self.crash_before and len(self.lr) + 1 == self.crash_before:
            raise Crash(f"killed before step {self.crash_before}")
        self.lr.append([float(group["lr"]) for group in optimizer.param_groups])
        self.grad_norm.append(grad_norm(optimizer))

    def post(self, optimizer, args, kwargs) -> None:
        self.optimizer = optimizer
        for callback in self.after_step:
            callback(optimizer)

    @property
    def steps(self) -> int:
        return len(self.lr)


def grad_norm(optimizer: torch.optim.Optimizer) -> float:
    """The L2 norm of every gradient the step is about to use, summed in float64."""
    total = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


class HandEMA:
    """The exponential moving average of a trained model's weights and buffers, by hand.

    A global forward pre-hook notes the modules run in training mode; after an optimizer's
    first step the model is the smallest of them that holds all the optimizer's parameters (a
    resumed run's new model is found the same way). After every step: ``avg = decay * avg +
    (1 - decay) * w`` for each floating-point entry of the model's state dict, the first step
    copying (``torch.optim.swa_utils.get_ema_multi_avg_fn`` with ``use_buffers=True``). Use
    as ``StepRecorder(after_step=(ema.update,))`` inside ``with ema:``.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.average: dict[str, torch.Tensor] = {}
        self.seen: dict[int, nn.Module] = {}
        self.optimizer = None
        self.model: nn.Module | None = None

    def __enter__(self) -> HandEMA:
        self.handle = nn.modules.module.register_module_forward_pre_hook(self.note)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def note(self, module: nn.Module, inputs) -> None:
        if module.training:
            self.seen.setdefault(id(module), module)

    def find_model(self, optimizer) -> nn.Module:
        wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
        holders = [m for m in self.seen.values() if wanted <= {id(p) for p in m.parameters()}]
        assert holders, "no module run in training mode holds the optimizer's parameters"
        return min(holders, key=lambda m: sum(1 for _ in m.parameters()))

    def update(self, optimizer) -> None:
        if optimizer is not self.optimizer:
            self.optimizer, self.model = optimizer, self.find_model(optimizer)
        self.seen.clear()
        for name, value in self.model.state_dict().items():
            value = value.detach()
            if name not in self.average:
                self.average[name] = value.clone()
            elif value.is_floating_point():
                self.average[name].mul_(self.decay).add_(value, alpha=1 - self.decay)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: each entry's name, dtype, shape and bytes (memory format and
    device left out)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def params_hash(optimizer: torch.optim.Optimizer) -> str:
    """sha256 of an optimizer's parameters as a multiset (their order in the groups left out),
    for a loop that returns no weights."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    return hashlib.sha256(
        "".join(sorted(state_hash({"p": t}) for t in tensors)).encode()
    ).hexdigest()


# -- the data --------------------------------------------------------------------------------


@dataclass
class Data:
    fmnist: Path  # the synthetic Fashion-MNIST's IDX files (tests/conftest.py's fake_fmnist)
    bars: Path  # 16 images, a COCO ann.json (tests/conftest.py's write_bars)
    bars8: Path  # the same for 8 images


def build_data(root: Path) -> Data:
    """The conftest's synthetic sets under ``root``. The caller points
    ``reslab.data.fashion_mnist.SYSTEM_DIR`` at a missing folder, as ``fake_fmnist`` does."""
    from reslab.data import fashion_mnist

    conftest = load_by_path("reslab_tests_conftest", TESTS / "conftest.py")
    data = Data(root / "fmnist", root / "bars", root / "bars8")
    for folder in (data.fmnist, data.bars, data.bars8):
        folder.mkdir(parents=True)
    for split, n, seed in (("train", 40, 0), ("test", 20, 1)):
        images, labels = conftest.synthetic_images(n, seed)
        name = fashion_mnist.FILES[(split, "images")][0]
        fashion_mnist.write_idx(data.fmnist / f"{name}.gz", images)
        fashion_mnist.write_idx(data.fmnist / fashion_mnist.FILES[(split, "labels")][0], labels)
    conftest._write_bars(data.bars, 16)
    conftest._write_bars(data.bars8, 8)
    return data


def classifier_config(fmnist: Path, out: Path | None, **overrides):
    """tests/engine/test_train.py's tiny run: resnet20 at a quarter width on 16x16 inputs,
    2 epochs of 5 steps of 8 images, fp32, no time budget."""
    from reslab.engine.config import build_config

    values = dict(
        model="resnet20",
        model_kwargs={"width": 0.25},
        data_dir=str(fmnist),
        verify=False,
        image_size=16,
        epochs=2,
        max_minutes=0.0,
        precision="fp32",
        batch_size=8,
        lr=0.05,
        eval_batch_size=8,
        out=None if out is None else str(out),
    )
    return build_config("default", **{**values, **overrides})


def tiny_detector(num_classes: int = 3):
    """A quarter-width ResNet-18 C4 on 64-pixel images with few proposals and RoIs."""
    from reslab.models.detection import DetectorConfig, RoIHeadsConfig, RPNConfig, build_detector

    torch.manual_seed(0)
    return build_detector(
        DetectorConfig(
            backbone="resnet18",
            width=0.25,
            num_classes=num_classes,
            min_size=64,
            max_size=64,
            rpn=RPNConfig(
                pre_nms_top_n_train=100,
                post_nms_top_n_train=30,
                pre_nms_top_n_test=100,
                post_nms_top_n_test=30,
            ),
            roi_heads=RoIHeadsConfig(batch_size_per_image=16),
        )
    )


def detection_set(folder: Path, train: bool = True):
    from reslab.data.coco import CocoDetection, eval_transforms, train_transforms

    transforms = train_transforms() if train else eval_transforms()
    return CocoDetection(folder, folder / "ann.json", transforms=transforms)


def detector_config(**overrides):
    from reslab.engine.detection import DetectTrainConfig

    return DetectTrainConfig(**{"epochs": 2, "batch_size": 4, "warmup_iters": 3, **overrides})


# -- the scenarios: one run of each loop, its trace ------------------------------------------


def trace(recorder: StepRecorder, losses: dict, weights: dict) -> dict:
    return {
        "steps": recorder.steps,
        "lr": recorder.lr,
        "grad_norm": recorder.grad_norm,
        "losses": {k: [float(v) for v in values] for k, values in losses.items()},
        "weights": weights,
    }


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_classifier(data: Data, out: Path, **overrides) -> dict:
    from reslab.engine.checkpoint import load_checkpoint
    from reslab.engine.train import fit

    with StepRecorder() as recorder:
        fit(classifier_config(data.fmnist, out, **overrides), console=quiet())
    kept = load_checkpoint(out / "last.pt")
    records = jsonl(out / "metrics.jsonl")
    weights = {"state_dict": state_hash(kept["state_dict"])}
    if "train_state_dict" in kept:
        weights["train_state_dict"] = state_hash(kept["train_state_dict"])
    losses = {name: [r[name] for r in records] for name in ("train_loss", "test_loss")}
    return trace(recorder, losses, weights)


def run_detector(data: Data, out: Path) -> dict:
    from reslab.engine.checkpoint import load_checkpoint
    from reslab.engine.detection import train_detector

    model = tiny_detector()
    with StepRecorder() as recorder:
        train_detector(
            model, detection_set(data.bars8), detector_config(ema=0.9), out, console=quiet()
        )
    kept = load_checkpoint(out / "last.pt")
    log = jsonl(out / "log.jsonl")
    losses = {name: [r[name] for r in log] for name in log[0] if name.startswith("loss")}
    weights = {
        "state_dict": state_hash(kept["state_dict"]),
        "train_state_dict": state_hash(kept["train_state_dict"]),
    }
    return trace(recorder, losses, weights)


def run_box_pretrain(data: Data, out: Path) -> dict:
    from reslab.data.coco import CocoDetection
    from reslab.engine.box_pretrain import pretrain_box_classifier

    model = tiny_detector()
    dataset = CocoDetection(data.bars, data.bars / "ann.json")
    with StepRecorder() as recorder:
        # fewer steps than its 50 of warm-up: after them the rate follows the wall clock
        result = pretrain_box_classifier(
            model, dataset, minutes=10, batch_size=8, lr=0.05, max_steps=6, jitter=0.1,
            console=quiet(),
        )  # fmt: skip
    return trace(recorder, {"last": [result["loss"]]}, {"model": state_hash(model.state_dict())})


def run_rescorer(data: Data, out: Path) -> dict:
    from reslab.data.coco import CocoDetection
    from reslab.engine.rescore import train_rescorer

    dataset = CocoDetection(data.bars, data.bars / "ann.json")
    with StepRecorder() as recorder:
        rescorer, record = train_rescorer(
            dataset, minutes=10, batch_size=16, lr=0.05, max_steps=6, console=quiet()
        )
    return trace(
        recorder, {"last": [record["loss"]]}, {"rescorer": state_hash(rescorer.state_dict())}
    )


def run_degradation(data: Data, out: Path) -> dict:
    from reslab.analysis.degradation import DegradationConfig, normalize, train_fixed_budget
    from reslab.models import create_model

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (48,), generator=g)
    train, test = (normalize(images[:32]), labels[:32]), (normalize(images[32:]), labels[32:])
    # 2 epochs of 2 steps: the paper's /10 at half and three quarters falls on steps 3 and 4
    config = DegradationConfig(depths=(20, 32), epochs=2, train_size=32, batch_size=16)
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10)
    with StepRecorder() as recorder:
        history = train_fixed_budget(model, train, test, config)
    losses = {"train_loss": [row["train_loss"] for row in history]}
    return trace(recorder, losses, {"model": state_hash(model.state_dict())})


def run_seed_screen(data: Data, out: Path) -> dict:
    from reslab.engine.config import build_config

    seed_screen = load_by_path("seed_screen", TESTS.parent / "benchmarks" / "seed_screen.py")
    config = build_config(
        "best",
        data_dir=str(data.fmnist),
        verify=False,
        epochs=2,
        batch_size=8,
        model_kwargs={"stem": "cifar", "width": 0.125},
        max_minutes=0.0,
        precision="fp32",
        eval_batch_size=10,
    )
    with StepRecorder() as recorder:
        result = seed_screen.screen(config, copies=2, eval_every=1)
    losses = {"train_loss": [r["train_loss"] for r in result["history"]]}
    return trace(recorder, losses, {"params": params_hash(recorder.optimizer)})


SCENARIOS: dict[str, Callable[[Data, Path], dict]] = {
    # EMA and SAM (its second pass from the second epoch): the `best` preset's mechanisms
    "classifier_onecycle": lambda data, out: run_classifier(
        data, out, ema=0.9, sam=0.05, sam_start=0.5
    ),
    "classifier_step": lambda data, out: run_classifier(data, out, schedule="step"),
    "detector": run_detector,
    "box_pretrain": run_box_pretrain,
    "rescorer": run_rescorer,
    "degradation": run_degradation,
    "seed_screen": run_seed_screen,
}


# -- the golden file -------------------------------------------------------------------------


def machine() -> dict:
    """What decides the float results bit for bit: the CPU (model name, feature flags, so its
    ISA: AVX2, AVX-512, AMX) and torch's version."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return {
        "cpu": fields.get("model name", platform.processor()),
        "flags": " ".join(sorted(fields.get("flags", "").split())),
        "torch": torch.__version__,
    }


def encode(value):
    """Floats as float.hex(), so the file holds them exactly."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode_floats(values: list) -> list:
    return [decode_floats(v) if isinstance(v, list) else float.fromhex(v) for v in values]


def load_golden() -> dict:
    golden = json.loads(GOLDEN.read_text())
    for recorded in golden["scenarios"].values():
        recorded["lr"] = decode_floats(recorded["lr"])
        recorded["grad_norm"] = decode_floats(recorded["grad_norm"])
        recorded["losses"] = {k: decode_floats(v) for k, v in recorded["losses"].items()}
    return golden


def record(root: Path) -> dict:
    """Run every scenario under ``root`` and write the golden file; returns what it wrote."""
    from reslab.data import fashion_mnist

    torch.set_num_threads(1)
    fashion_mnist.SYSTEM_DIR = root / "no-system-dir"
    data = build_data(root / "data")
    scenarios = {name: encode(run(data, root / name)) for name, run in SCENARIOS.items()}
    golden = {
        "about": "tests/engine/loop_traces.py; rewrite with tests/golden/record_traces.py",
        "machine": machine(),
        "scenarios": scenarios,
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    return golden
