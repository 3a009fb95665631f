"""Side-by-side speed of torchvision's ResNet, reslab's default path, its fast path and ONNX.

All variants run in one process, in alternating rounds (a, b, c, d, a, b, c, d, ...), so a
change in the machine's load during the run touches every variant alike; medians over rounds
are reported, and the ratios within one run are what to compare. Achieved GFLOP/s is set
against a large matmul measured in the same rounds, at the same precision: the best rate the
machine's BLAS reaches at that moment.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reslab import fast
from reslab.errors import ReslabError
from reslab.export import export_onnx
from reslab.models import create_model
from reslab.models.resnet import STEMS, model_defaults
from reslab.precision import (
    bf16_supported,
    cpu_flags,
    cpuinfo_fields,
    resolve_precision,
    time_forward,
)

TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MATMUL_SIZE = 2048


@dataclass
class BenchConfig:
    model: str = "resnet18"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    # images per training step and per throughput inference call
    batch_size: int = 256
    rounds: int = 5
    warmup: int = 1
    # batch-1 latency: calls per round (the round's median is kept)
    latency_calls: int = 10
    compile: bool = False
    # the fast path's precision: fp32, bf16, or auto (reslab.precision's rule, timing the
    # prepared model's forward pass on a batch in each)
    precision: str = "auto"
    onnx: bool = True
    model_kwargs: dict = field(default_factory=dict)


def model_kwargs_for(name: str, input_shape: tuple[int, int, int]) -> dict:
    """Constructor overrides for an input: 1-channel 28x28 gets the Fashion-MNIST setup."""
    channels, height, _ = input_shape
    if channels == 1 and height <= 32:
        return {"in_channels": 1, "stem": "small", "num_classes": 10}
    return {"in_channels": channels}


def torchvision_twin(name: str, kwargs: dict) -> nn.Module:
    """torchvision's model of the same architecture: stem, input channels and classes."""
    if name not in TORCHVISION_NAMES:
        raise ReslabError(
            f"torchvision has no twin of {name!r}; bench compares one of {TORCHVISION_NAMES}"
        )
    args = {**model_defaults(name), **kwargs}
    if args.get("width", 1.0) != 1.0 or args.get("shortcut", "B") != "B":
        raise ReslabError("bench compares with torchvision: width 1 and shortcut B only")
    twin = torchvision.models.get_model(name, weights=None, num_classes=args["num_classes"])
    kernel, stride, padding, pool = STEMS[args["stem"]]
    twin.conv1 = nn.Conv2d(args["in_channels"], 64, kernel, stride, padding, bias=False)
    if not pool:
        twin.maxpool = nn.Identity()
    return twin


def forward_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one image's forward pass (FlopCounterMode: 2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


def cpu_identity(cpuinfo: str | None = None) -> dict:
    """The first processor's name, vendor, family and model number from /proc/cpuinfo text
    (default: the file).

    Different processors can report the same name (two CPU families sold under one name), so a
    result records the family and model number too, to say which of them ran it; a field the
    text lacks is None."""
    fields = cpuinfo_fields(cpuinfo)
    keys = {
        "model name": "cpu_model",
        "vendor_id": "cpu_vendor",
        "cpu family": "cpu_family",
        "model": "cpu_model_number",
    }
    found = {name: fields.get(key) for key, name in keys.items()}
    return {k: int(v) if v is not None and v.isdigit() else v for k, v in found.items()}


def machine_info() -> dict:
    cpu = cpu_identity()
    cpu["cpu_model"] = cpu["cpu_model"] or platform.processor()
    import onnxruntime

    return {
        **cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_native": bf16_supported(),
        # the flags that decide which precision pays: AVX-512 bf16 and VNNI (int8), AMX
        "cpu_flags": sorted(
            f
            for f in cpu_flags()
            if f.startswith(("avx512_bf16", "avx512_vnni", "avx_vnni", "amx"))
        ),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        # a GPU, where runs were told to use one (--device cuda); None on CPU-only machines
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Variant:
    """One row of the table: a way to train and to predict, measured call by call."""

    def __init__(self, key, label, precision, layout, train_step, infer, infer_batch1=None):
        self.key, self.label, self.precision, self.layout = key, label, precision, layout
        self.train_step = train_step  # None: inference only (onnxruntime)
        self.infer = infer
        self.samples: dict[str, list[float]] = {"train": [], "infer": [], "latency": []}


def _torch_variant(key, label, model, precision, channels_last, cfg, compile=False):
    images = torch.randn(cfg.batch_size, *cfg.input_shape)
    labels = torch.randint(0, 10, (cfg.batch_size,))
    # each variant trains its own copy: prepare_for_training changes the layout in place, and
    # a channels_last weight would switch the default path's convolutions to channels_last too
    train_model, precision = fast.prepare_for_training(
        copy.deepcopy(model), precision, channels_last=channels_last, compile=compile
    )
    optimizer = torch.optim.SGD(train_model.parameters(), lr=1e-3, momentum=0.9)
    train_x = fast.to_input(images, channels_last)

    def train_step():
        train_model.train()
        optimizer.zero_grad(set_to_none=True)
        with fast.autocast(precision):
            logits = train_model(train_x)
        # the loss in fp32 whatever the compute precision
        nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    fold = key == "fast"
    predictor = fast.prepare_for_inference(
        model, precision, fold_bn=fold, channels_last=channels_last, compile=compile
    )

    def infer(x):
        with torch.inference_mode():
            predictor(x)

    layout = "channels_last" if channels_last else "NCHW"
    if fold:
        layout += ", folded BN"
    if compile:
        layout += ", compiled"
    return Variant(key, label, precision, layout, train_step, infer)


def _onnx_variant(model, cfg, workdir) -> tuple[Variant, float]:
    import onnxruntime

    path = Path(workdir) / "model.onnx"
    check = export_onnx(fast.fold_batchnorm(model), path, cfg.input_shape)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def infer(x):
        session.run(None, {"images": x.numpy()})

    return Variant("onnx", "(d) onnxruntime", "fp32", "folded BN", None, infer), check


def _matmul_rate(dtype: torch.dtype) -> float:
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
    a @ b
    return 2 * MATMUL_SIZE**3 / _timed(lambda: a @ b) / 1e9


def resolve_fast_precision(cfg: BenchConfig, reference: nn.Module) -> str:
    """``cfg.precision``, "auto" resolved on the prepared model's forward pass on a batch."""
    example = torch.randn(cfg.batch_size, *cfg.input_shape)

    def measure(precision: str) -> float:
        return time_forward(fast.prepare_for_inference(reference, precision), example)

    return resolve_precision(cfg.precision, measure=measure)[0]


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every variant in alternating rounds; return a JSON-ready result."""
    if cfg.rounds < 1 or cfg.batch_size < 1 or cfg.warmup < 0:
        raise ReslabError("--rounds and --batch-size must be at least 1, --warmup at least 0")
    kwargs = {**model_kwargs_for(cfg.model, cfg.input_shape), **cfg.model_kwargs}
    info = machine_info()
    torch.manual_seed(0)
    twin = torchvision_twin(cfg.model, kwargs)
    reference = create_model(cfg.model, **kwargs)
    # same architecture, parameter for parameter: torchvision's weights load strictly
    reference.load_state_dict(twin.state_dict(), strict=True)
    flops = forward_flops(reference, cfg.input_shape)
    fast_precision = resolve_fast_precision(cfg, reference)

    with tempfile.TemporaryDirectory() as workdir:
        variants = [
            _torch_variant("torchvision", "(a) torchvision eager", twin, "fp32", False, cfg),
            _torch_variant("default", "(b) reslab default", reference, "fp32", False, cfg),
            _torch_variant(
                "fast", "(c) reslab fast", reference, fast_precision, True, cfg, cfg.compile
            ),
        ]
        if fast_precision == "fp32" and bf16_supported():
            # the precision fp32 was chosen over, or given instead of, trained and timed too
            variants.append(
                _torch_variant(
                    "fast_bf16", "(c) reslab fast, bf16", reference, "bf16", True, cfg, cfg.compile
                )
            )
        onnx_check = None
        if cfg.onnx:
            variant, onnx_check = _onnx_variant(reference, cfg, workdir)
            variants.append(variant)
        batch = torch.randn(cfg.batch_size, *cfg.input_shape)
        single = torch.randn(1, *cfg.input_shape)
        precisions = sorted({v.precision for v in variants})
        matmul: dict[str, list[float]] = {p: [] for p in precisions}

        for variant in variants:
            progress(f"warming up {variant.label}")
            for _ in range(cfg.warmup):
                if variant.train_step:
                    variant.train_step()
                variant.infer(batch)
                variant.infer(single)
        for round_index in range(cfg.rounds):
            progress(f"round {round_index + 1}/{cfg.rounds}")
            for precision in precisions:
                matmul[precision].append(_matmul_rate(fast.DTYPES[precision]))
            for variant in variants:
                if variant.train_step:
                    variant.samples["train"].append(_timed(variant.train_step))
                variant.samples["infer"].append(_timed(lambda v=variant: v.infer(batch)))
                calls = [
                    _timed(lambda v=variant: v.infer(single)) for _ in range(cfg.latency_calls)
                ]
                variant.samples["latency"].append(statistics.median(calls))
    info["load_average_end"] = os.getloadavg()
    return summarize(cfg, kwargs, info, flops, matmul, variants, onnx_check)


def summarize(cfg, kwargs, info, flops, matmul, variants, onnx_check) -> dict:
    matmul_median = {p: statistics.median(r) for p, r in matmul.items()}
    rows = {}
    for v in variants:
        row = {
            "label": v.label,
            "precision": v.precision,
            "layout": v.layout,
            "samples_s": v.samples,
        }
        peak = matmul_median[v.precision]
        if v.samples["train"]:
            step = statistics.median(v.samples["train"])
            row["train_img_s"] = cfg.batch_size / step
            row["train_gflop_s"] = 3 * flops * cfg.batch_size / step / 1e9
            row["train_fraction_of_matmul"] = row["train_gflop_s"] / peak
        call = statistics.median(v.samples["infer"])
        row["infer_img_s"] = cfg.batch_size / call
        row["infer_gflop_s"] = flops * cfg.batch_size / call / 1e9
        row["infer_fraction_of_matmul"] = row["infer_gflop_s"] / peak
        row["latency_ms"] = 1e3 * statistics.median(v.samples["latency"])
        rows[v.key] = row
    base = rows["torchvision"]
    for row in rows.values():
        for metric in ("train_img_s", "infer_img_s"):
            if metric in row:
                row[metric.replace("img_s", "ratio")] = row[metric] / base[metric]
        row["latency_speedup"] = base["latency_ms"] / row["latency_ms"]
    return {
        "config": {**asdict(cfg), "model_kwargs": kwargs},
        "machine": info,
        "forward_gflop_per_image": flops / 1e9,
        "matmul_gflop_s": {
            p: {"median": matmul_median[p], "rounds": r, "size": MATMUL_SIZE}
            for p, r in matmul.items()
        },
        "onnx_check": onnx_check,
        "variants": rows,
    }
