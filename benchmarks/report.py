"""Write docs/results.md from every benchmarks/results/*.json.

    .venv/bin/python benchmarks/report.py           # rewrite docs/results.md
    .venv/bin/python benchmarks/report.py --check   # exit 1 if docs/results.md is stale

One table per task, one row per run, each row linking to its result file. The result files
were written by several versions of the benchmark scripts, so every key is optional: a value
a file does not record is shown as a dash. Rows are sorted by file name (which starts with the
run's date), so the same files always give the same page. Reads JSON only: no reslab import.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
LINK_PREFIX = "../benchmarks/results/"  # from docs/results.md
DASH = "-"

# The values most Fashion-MNIST runs share; a recipe lists only what differs from them, so a
# row says what was special about the run rather than repeating the whole config.
COMMON_RECIPE = {
    "optimizer": "sgd",
    "schedule": "onecycle",
    "warmup": 0.2,
    "weight_decay": 0.0005,
    "label_smoothing": 0.1,
    "augment": True,
    "crop_padding": 2,
    "erasing": 0.0,
    "cutmix": 0.0,
    "clean_epochs": 0,
    "ema": 0.0,
    "sam": 0.0,
    "tta": True,
    "tta_shift": 0,
    "image_size": None,
    "seed": 0,
    "data": None,
}


# ---------------------------------------------------------------------------- formatting


def get(data: object, *path: str | int, default: object = None) -> object:
    """``data[path[0]][path[1]]...``, or ``default`` where any step is missing."""
    for key in path:
        try:
            data = data[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return default
    return data


def number(value: object, digits: int) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return DASH
    return f"{value:,.{digits}f}"


def percent(value: object) -> str:
    """A fraction as a percentage with the digits the file holds (0.9555 -> 95.55%)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return DASH
    for digits in (2, 3, 4):
        if abs(round(value * 100, digits) - value * 100) < 1e-9:
            return f"{value * 100:.{digits}f}%"
    return f"{value * 100:.2f}%"


def minutes(seconds: object) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return DASH
    return f"{seconds / 60:.1f} min"


def compact(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(compact(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def load_averages(values: list) -> str:
    """One-minute load averages (start, end), those recorded."""
    return ", ".join(number(v, 1) for v in values if v is not None) or DASH


def link(path: Path) -> str:
    return f"[`{path.stem}`]({LINK_PREFIX}{path.name})"


def machine(info: object) -> str:
    """CPU name, vendor/family/model where recorded, ISA, native bf16 and cores; or the GPU."""
    if not isinstance(info, dict):
        return DASH
    cpu = info.get("cpu_model") or info.get("cpu") or ""
    if info.get("cpu_family") is not None:
        vendor = f"{info['cpu_vendor']} " if info.get("cpu_vendor") else ""
        cpu += f" ({vendor}family {info['cpu_family']} model {info.get('cpu_model_number', '?')})"
    flags = set(info.get("cpu_flags") or [])
    extras = [info["torch_cpu_capability"]] if info.get("torch_cpu_capability") else []
    if "amx_bf16" in flags:
        extras.append("AMX")
    elif "avx512_bf16" in flags:
        extras.append("AVX512-BF16")
    elif info.get("bf16_native") and not flags:
        extras.append("native bf16")
    if info.get("cores"):
        extras.append(f"{info['cores']} cores")
    text = ", ".join([cpu, *extras]) if cpu else ", ".join(extras)
    if info.get("gpu"):
        text = f"{info['gpu']}" + (f" (host: {text})" if text else "")
    return text or DASH


def table(headers: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def load(pattern: str) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(RESULTS.glob(pattern)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out.append((path, data))
    return out


# ---------------------------------------------------------------------------- tasks


def recipe(config: dict) -> str:
    kwargs = config.get("model_kwargs") or {}
    parts = [str(config.get("model", "?"))]
    for key in ("stem", "width", "widths", "shortcut", "se", "zero_init_residual"):
        if key in kwargs:
            parts.append(f"{key} {compact(kwargs[key])}")
    for key in ("epochs", "batch_size", "lr"):
        if key in config:
            parts.append(f"{key.replace('_', ' ')} {compact(config[key])}")
    if config.get("max_minutes"):
        parts.append(f"max {compact(config['max_minutes'])} min")
    for key, common in COMMON_RECIPE.items():
        if key in ("erasing", "cutmix", "crop_padding") and config.get("augment") is False:
            continue
        if key in config and config[key] != common:
            parts.append(f"{key.replace('_', ' ')} {compact(config[key])}")
    return ", ".join(parts)


def run_status(run: dict) -> str:
    history = run.get("history") or []
    done = run.get("completed_epochs", len(history) or None)
    planned = get(run, "config", "epochs")
    stopped = run.get("stopped") or run.get("exit_status") not in (None, 0)
    if done is None:
        return DASH
    return f"{done} of {planned} (stopped)" if stopped and planned else str(done)


def classification_rows(files: list[tuple[Path, dict]], folders: bool) -> list[list[str]]:
    rows = []
    for path, data in files:
        for run in data.get("runs") or []:
            config = run.get("config") or {}
            if bool(config.get("data")) != folders:
                continue
            rows.append(
                [
                    link(path),
                    f"`{run.get('preset', DASH)}`",
                    recipe(config),
                    run_status(run),
                    percent(run.get("test_accuracy")),
                    minutes(run.get("seconds")),
                    minutes(run.get("seconds_to_94")),
                    number(run.get("train_img_per_s"), 0),
                    machine(data.get("machine")),
                    str(config.get("device", "cpu")) + ", " + str(config.get("precision", DASH)),
                ]
            )
    return rows


def seed_rows(files: list[tuple[Path, dict]]) -> list[list[str]]:
    rows = []
    for path, data in files:
        for preset, seeds in (data.get("seeds") or {}).items():
            rows.append(
                [
                    link(path),
                    f"`{preset}`",
                    compact(seeds.get("seeds", DASH)),
                    percent(seeds.get("mean_accuracy")),
                    number(100 * seeds["std_accuracy"], 2) if "std_accuracy" in seeds else DASH,
                    f"{percent(seeds.get('min_accuracy'))}-{percent(seeds.get('max_accuracy'))}",
                    minutes(seeds.get("max_seconds")),
                    str(seeds.get("reached_94", DASH)),
                    minutes(seeds.get("mean_seconds_to_94")),
                    machine(data.get("machine")),
                ]
            )
    return rows


def classification(files: list[tuple[Path, dict]]) -> list[str]:
    headers = [
        "result file",
        "preset",
        "recipe (differences from the common settings)",
        "epochs",
        "test accuracy",
        "wall time",
        "to 94%",
        "train img/s",
        "machine",
        "device, precision",
    ]
    out = ["## Classification: Fashion-MNIST", ""]
    out += [
        "`benchmarks/fashion_mnist.py` runs `reslab train --preset P` in its own process, times it",
        "from start to exit and scores the last epoch on all 10,000 test images. *Test accuracy*",
        "is the last epoch's; *to 94%* is the time to the first epoch at 94% or above; *train",
        "img/s* is the run's mean. A recipe lists the model and the settings that differ from",
        "SGD with Nesterov momentum, one-cycle schedule (warm-up 0.2), weight decay 5e-4, label",
        "smoothing 0.1, crop (padding 2) and flip, mirror test-time augmentation, seed 0.",
        "",
    ]
    for preset in ("seed", "default", "speedrun", "best"):
        rows = [r for r in classification_rows(files, folders=False) if r[1] == f"`{preset}`"]
        if rows:
            out += [f"### Preset `{preset}`", "", *table(headers, rows), ""]
    rows = seed_rows(files)
    if rows:
        out += ["### Means over seeds", ""]
        out += [
            "`benchmarks/fashion_mnist.py --seeds N`: each preset's runs with seeds 0..N-1 in one",
            "result file; *spread* is the sample standard deviation in points.",
            "",
        ]
        seed_headers = ["result file", "preset", "seeds", "mean accuracy", "spread", "range"]
        seed_headers += ["longest run", "reached 94%", "mean time to 94%", "machine"]
        out += [*table(seed_headers, rows), ""]
    out += ["## Classification: image folders", ""]
    rows = classification_rows(files, folders=True)
    out += table(headers, rows) if rows else ["No result file records an image-folder run."]
    return out + [""]


def detection_recipe(data: dict) -> str:
    det = data.get("detector") or {}
    train = data.get("train") or {}
    parts = [f"{det.get('backbone', '?')} C4"]
    if "width" in det:
        parts.append(f"width {compact(det['width'])}")
    scenes = data.get("scenes") or {}
    if "images" in scenes:
        parts.append(f"{scenes['images']} scenes of {scenes.get('size', '?')} px")
    if det.get("min_size"):
        parts.append(f"resized {det['min_size']}")
    if get(det, "rpn", "anchor_sizes"):
        parts.append(f"anchors {compact(det['rpn']['anchor_sizes'])}")
    for label, key in (("lr", "lr"), ("batch", "batch_size"), ("seed", "seed")):
        if key in train:
            parts.append(f"{label} {compact(train[key])}")
    rois = get(det, "roi_heads", "batch_size_per_image")
    if rois is not None:
        frac = get(det, "roi_heads", "positive_fraction", default="?")
        parts.append(f"{rois} RoIs/image ({compact(frac)} positive)")
    pre, post = get(det, "rpn", "pre_nms_top_n_train"), get(det, "rpn", "post_nms_top_n_train")
    if pre is not None:
        parts.append(f"RPN train {pre}/{post}")
    if data.get("processes"):
        parts.append(f"{data['processes']} processes")
    if get(data, "pretrain", "seconds"):
        parts.append(f"pretrain {data['pretrain']['seconds'] / 60:.0f} min")
    if get(data, "rescorer", "seconds"):
        parts.append(f"rescore {data['rescorer']['seconds'] / 60:.0f} min")
    if train.get("ema"):
        parts.append(f"EMA {compact(train['ema'])}")
    return ", ".join(parts)


def map50(metrics: object, low: bool = False) -> str:
    if low:
        metrics = get(metrics, "low_score")
    return number(get(metrics, "mAP50"), 3)


def detection_train(files: list[tuple[Path, dict]]) -> list[str]:
    headers = [
        "result file",
        "recipe",
        "steps",
        "train time",
        "mAP@.5",
        "mAP@[.5:.95]",
        "int8 head",
        "flip",
        "views",
        "views + refine",
        "best at score 0.001",
        "machine",
        "precision",
    ]
    rows = []
    for path, data in files:
        keys = ("metrics_flip", "metrics_views", "metrics_refined")
        low = [get(data, k, "low_score", "mAP50") for k in keys]
        low = [v for v in low if isinstance(v, int | float)]
        rows.append(
            [
                link(path),
                detection_recipe(data),
                number(data.get("steps"), 0),
                minutes(
                    data["train_minutes"] * 60
                    if isinstance(data.get("train_minutes"), int | float)
                    else None
                ),
                map50(data.get("metrics")),
                number(get(data, "metrics", "mAP"), 3),
                map50(data.get("metrics_int8_head")),
                map50(data.get("metrics_flip")),
                map50(data.get("metrics_views")),
                map50(data.get("metrics_refined")),
                number(max(low), 3) if low else DASH,
                machine(data.get("machine")),
                "bf16" if get(data, "train", "bf16") else "fp32",
            ]
        )
    return [
        "## Detection: training within a budget",
        "",
        "`benchmarks/detection.py train` trains a C4 Faster R-CNN on Fashion-MNIST scenes for a",
        "wall-time budget and scores COCO mAP on the val scenes. *flip*, *views* (`--flip",
        "--scales 1,1.125,1.25`) and *views + refine* are mAP@.5 of the same checkpoint's",
        "test-time evaluations; where the checkpoint has a rescoring classifier, every column is",
        "rescored (the file also keeps the detector's own scores under `not_rescored`). *Train",
        "time* is the detector's own training; rescorer and pretraining minutes come first.",
        "",
        *table(headers, rows),
        "",
    ]


def detection_nms(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "checkpoint", "chosen NMS", "val mAP@.5", "at score 0.001", "machine"]
    rows = [
        [
            link(path),
            f"`{data.get('checkpoint', DASH)}`",
            compact(data.get("chosen_nms", DASH)),
            map50(data.get("metrics")),
            map50(data.get("metrics"), low=True),
            machine(data.get("machine")),
        ]
        for path, data in files
    ]
    return [
        "## Detection: box NMS chosen on tuning scenes",
        "",
        "`benchmarks/detection.py nms CKPT` picks the box NMS threshold on held-out tuning scenes,",
        "then scores the val split once with it, the views and `--refine`.",
        "",
        *table(headers, rows),
        "",
    ]


def detection_plan(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "set", "recipe", "steps", "train min", "mAP@.5", "mAP@[.5:.95]"]
    headers += ["planned vs the other recipe", "load avg start, end", "machine"]
    rows = []
    for path, data in files:
        runs = data.get("runs") or {}
        other = next((name for name in runs if name != "planned"), None)
        base = get(runs, other, "metrics", "mAP50")
        for name, run in runs.items():
            m50 = get(run, "metrics", "mAP50")
            ratio = DASH
            numbers = isinstance(base, int | float) and isinstance(m50, int | float)
            if name == "planned" and numbers:
                ratio = f"{m50 - base:+.3f}" + (f" ({m50 / base:.2f}x)" if base else "")
            load_start = get(data, "machine", "load_average_start", 0)
            load_end = get(data, "load_average_end", 0)
            rows.append(
                [
                    link(path),
                    get(data, "set", "name", default="unlike"),
                    name,
                    compact(run.get("steps", DASH)),
                    minutes(run.get("train_seconds")),
                    number(m50, 3),
                    number(get(run, "metrics", "mAP"), 3),
                    ratio,
                    f"{number(load_start, 1)}, {number(load_end, 1)}",
                    machine(data.get("machine")),
                ]
            )
    return [
        "## Detection: the planned recipe (`benchmarks/detection_plan.py`)",
        "",
        "Set `unlike`: a COCO set unlike the scenes (192-pixel canvases, items 0.1-0.25 of the",
        "side, 240 training images, category ids 3, 10, 17, ..., a tenth empty images), trained",
        "with `reslab detect train --images --annotations --max-minutes M` and nothing else,",
        "planned and with `--recipe detectron2`. Set `scenes`: the 8,000 Fashion-MNIST scenes,",
        "planned and with the scenes' fifteen-flag recipe (`scenes_flags`). One run after the",
        "other, mAP on the set's val split, the planned run's difference from the other run.",
        "The load average (1 minute) says how busy the cores were.",
        "",
        *table(headers, rows),
        "",
    ]


def precision_of(label: str) -> str:
    return "int8 res5" if "int8" in label else "bf16" if "bf16" in label else "fp32"


def detection_infer(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "network", "s / image", "trunk + RPN s", "head s", "rounds"]
    headers += ["machine", "precision"]
    rows = []
    for path, data in files:
        for label, row in (data.get("summary") or {}).items():
            rows.append(
                [
                    link(path),
                    label,
                    number(get(row, "total_s"), 2),
                    number(get(row, "trunk_rpn_s"), 2),
                    number(get(row, "head_s"), 2),
                    compact(data.get("rounds", DASH)),
                    machine(data.get("machine")),
                    precision_of(label),
                ]
            )
    return [
        "## Detection: inference speed",
        "",
        "`benchmarks/detection.py infer` times ResNet-101-C4 on one 512x512 image with 1000 RoIs",
        "reaching the res5 head, beside the same network assembled from torchvision's resnet101,",
        "in alternating rounds in one process (median seconds per image). Compare rows within",
        "one file: machines and sessions differ.",
        "",
        *table(headers, rows),
        "",
    ]


def bench(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "model, input, batch", "variant", "precision, layout"]
    headers += ["train img/s", "x (a)", "infer img/s", "x (a)", "batch-1 ms", "machine"]
    rows = []
    for path, data in files:
        cfg = data.get("config") or {}
        what = (
            f"{cfg.get('model', '?')}, {compact(cfg.get('input_shape', '?')).replace(',', 'x')}, "
            f"batch {cfg.get('batch_size', '?')}" + (", compiled" if cfg.get("compile") else "")
        )
        for key, var in (data.get("variants") or {}).items():
            rows.append(
                [
                    link(path),
                    what,
                    str(var.get("label", key)),
                    f"{var.get('precision', DASH)}, {var.get('layout', DASH)}",
                    number(var.get("train_img_s"), 1),
                    number(var.get("train_ratio"), 2),
                    number(var.get("infer_img_s"), 1),
                    number(var.get("infer_ratio"), 2),
                    number(var.get("latency_ms"), 1),
                    machine(data.get("machine")),
                ]
            )
    return [
        "## Speed: `reslab bench`",
        "",
        "(a) torchvision's model in eager fp32, (b) reslab's default path, (c) the fast path",
        "(channels_last, folded batch norm for inference), (d) the ONNX file in onnxruntime;",
        "medians over alternating rounds in one process, *x (a)* the ratio to (a).",
        "",
        *table(headers, rows),
        "",
    ]


def train_step(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "model", "batch", "image", "precision", "channels_last"]
    headers += ["train img/s", "machine"]
    rows = []
    for path, data in files:
        model = data.get("model") or {}
        name = ", ".join(
            [str(model.get("name", "?"))]
            + [
                f"{k} {compact(model[k])}"
                for k in ("stem", "width", "widths", "layers", "se")
                if k in model
            ]
        )
        for result in data.get("results") or []:
            rows.append(
                [
                    link(path),
                    name,
                    compact(data.get("batch_size", DASH)),
                    compact(data.get("image_size", DASH)),
                    str(result.get("precision", DASH)),
                    "yes" if result.get("channels_last") else "no",
                    number(result.get("img_per_s"), 0),
                    machine(data.get("machine")),
                ]
            )
    return [
        "## Speed: training steps (`benchmarks/train_step.py`)",
        "",
        "Training images per second of one model in each precision and memory layout.",
        "",
        *table(headers, rows),
        "",
    ]


def kernels(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "kernel", "fp32 GFLOP/s", "bf16 GFLOP/s", "int8 GOP/s", "machine"]
    rows = []
    for path, data in files:
        for name, rates in (data.get("gops") or {}).items():
            rows.append(
                [
                    link(path),
                    name,
                    *(number(get(rates, k), 0) for k in ("fp32", "bf16", "int8")),
                    machine(data.get("machine")),
                ]
            )
    return [
        "## Speed: kernels (`benchmarks/kernels.py`)",
        "",
        "A 2048x2048 matrix product and res5's convolutions in each number format.",
        "",
        *table(headers, rows),
        "",
    ]


def seed_screen(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "variant", "copies", "epochs", "mean, 10 views", "sd"]
    headers += ["mean, mirror", "wall time", "machine"]
    rows = []
    for path, data in files:
        for var in data.get("variants") or []:
            rows.append(
                [
                    link(path),
                    f"`{var.get('name', DASH)}` (widths {compact(var.get('widths_per_copy', '?'))})",
                    compact(var.get("copies", DASH)),
                    compact(var.get("epochs", DASH)),
                    percent(var.get("mean_views")),
                    number(var["stdev_views"] * 100, 2) if "stdev_views" in var else DASH,
                    percent(var.get("mean_mirror")),
                    minutes(var.get("seconds")),
                    machine({**(data.get("machine") or {}), "gpu": var.get("gpu")}),
                ]
            )
    return [
        "## Classification: seed screen (`benchmarks/seed_screen.py`)",
        "",
        "N seeds of a recipe trained at once as one grouped network on a GPU, each copy scored",
        "apart; the mean and standard deviation (points) over the copies, bf16.",
        "",
        *table(headers, rows),
        "",
    ]


def serve_load(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "fast path", "threads", "clients", "req/s", "p50 ms", "p99 ms"]
    headers += ["failed"]
    headers += ["mean batch", "upload ms", "decode ms", "model ms", "rest ms"]
    headers += ["load avg start, end"]
    headers += ["machine"]
    rows = []
    for path, data in files:
        load = [get(data, key, 0) for key in ("load_average_start", "load_average_end")]
        load_text = ", ".join(number(v, 2) for v in load if v is not None) or DASH
        for r in data.get("results") or []:
            if r.get("route"):  # the bare-HTTP baseline row, shown below the table
                continue
            rows.append(
                [
                    link(path),
                    "on" if r.get("fast") else "off",
                    compact(r.get("threads") or "default"),
                    compact(r.get("clients", DASH)),
                    number(r.get("requests_per_s"), 0),
                    number(r.get("p50_ms"), 1),
                    number(r.get("p99_ms"), 1),
                    compact(r.get("failed", DASH)),
                    number(r.get("mean_batch"), 1),
                    number(r.get("upload_ms"), 2),
                    number(r.get("decode_ms"), 2),
                    number(r.get("model_ms"), 2),
                    number(r.get("rest_ms"), 2),
                    load_text,
                    machine(data.get("machine")),
                ]
            )
    bare = [
        f"{link(path)}: {number(r.get('requests_per_s'), 0)} req/s at "
        f"{compact(r.get('clients'))} clients"
        for path, data in files
        for r in data.get("results") or []
        if r.get("route") == "GET /health"
    ]
    return [
        "## Serving: `reslab serve` under load (`benchmarks/serve_load.py`)",
        "",
        "`POST /predict` with one Fashion-MNIST test image over loopback, each client a",
        "keep-alive connection sending its next request when the last is answered; server and",
        "load generator on the same cores, shared with other work (the load average says how",
        "much). upload: the server's milliseconds per request reading the body and its",
        "multipart form; decode, model: those per request of each batch (a batch's time divided",
        "by its size); rest: the cores' time per request (cores / req/s) left for HTTP, JSON,",
        "the event loop, the hand-offs to the batch thread and the load generator.",
        "",
        *table(headers, rows),
        "",
        *(["Bare HTTP, `GET /health`: " + "; ".join(bare) + ".", ""] if bare else []),
    ]


def load_range(data: dict) -> str:
    start = get(data, "machine", "load_average_start", 0)
    return f"{number(start, 1)} -> {number(get(data, 'load_average_end', 0), 1)}"


def mean_sd(recipe: object) -> str:
    """A recipe's mean accuracy and its standard deviation in points."""
    if not isinstance(recipe, dict) or "mean" not in recipe:
        return DASH
    return f"{percent(recipe['mean'])} ± {number(100 * recipe.get('stdev', 0), 2)}"


def transfer(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "target images", "epochs", "seeds", "pretrained (source)"]
    headers += ["scratch", "fine-tuned", "fine-tuned, train_bn", "load", "machine"]
    rows = []
    for path, data in files:
        recipes = data.get("recipes") or {}

        rows.append(
            [
                link(path),
                f"{compact(data.get('per_class', DASH))} a class",
                compact(data.get("epochs", DASH)),
                compact(len(get(recipes, "scratch", "runs", default=[]))),
                percent(get(data, "pretrain", "test_acc")),
                mean_sd(recipes.get("scratch")),
                mean_sd(recipes.get("finetune")),
                mean_sd(recipes.get("finetune_train_bn")),
                load_range(data),
                machine(data.get("machine")),
            ]
        )
    return [
        "## Fine-tuning: transfer (`benchmarks/transfer.py`)",
        "",
        "A network pretrained on five Fashion-MNIST classes, fine-tuned on a small folder of the",
        "other five, against the same network from scratch with the same batch and epochs; test",
        "accuracy on every test image of the five target classes, mean ± standard deviation",
        "(points) over the seeds.",
        "",
        *table(headers, rows),
        "",
    ]


def finetune_speed(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "model", "library", "unfrozen", "frozen", "body forward"]
    headers += ["cached head", "decode PIL / tv.io (1 core)", "frozen phase, cached / not"]
    headers += ["load", "machine"]
    rows = []
    for path, data in files:
        decode = data.get("decode_img_per_s_one_core") or {}
        frozen = get(data, "frozen_phase", "seconds", default={})
        phase = DASH
        if frozen:
            phase = (
                f"{number(frozen.get('cached'), 1)} s / {number(frozen.get('uncached'), 1)} s "
                f"({get(data, 'frozen_phase', 'epochs')} epochs, "
                f"{get(data, 'frozen_phase', 'images')} photos)"
            )
        for library, rates in (data.get("train_img_per_s") or {}).items():
            rows.append(
                [
                    link(path),
                    f"{data.get('model', '?')} at {data.get('image_size', '?')} px",
                    library,
                    *(
                        number(rates.get(k), 1)
                        for k in ("unfrozen", "frozen", "body_forward", "cached_head")
                    ),
                    f"{number(decode.get('pil_open_image'), 0)} / "
                    f"{number(decode.get('torchvision_io'), 0)}",
                    phase if library == "reslab" else DASH,
                    load_range(data),
                    machine(data.get("machine")),
                ]
            )
    return [
        "## Fine-tuning: speed (`benchmarks/finetune_speed.py`)",
        "",
        "Training images/s at 224 px, body unfrozen, frozen (head trained, batch norm in eval",
        "mode), its forward pass alone, and the head on cached features; reslab's model and",
        "torchvision's in the same run. Decoding: JPEG photos to 224 px, images/s on one core.",
        "The frozen phase of a real run on a folder, with `--cache-features` and without.",
        "",
        *table(headers, rows),
        "",
    ]


def finetune_run(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "photos", "model", "epochs (frozen)", "img/s per epoch"]
    headers += ["whole command", "load", "machine"]
    rows = []
    for path, data in files:
        config = data.get("config") or {}
        rates = ", ".join(number(r.get("img_per_s"), 1) for r in data.get("epochs") or [])
        rows.append(
            [
                link(path),
                compact(data.get("images", DASH)),
                str(data.get("model", DASH)),
                f"{compact(config.get('epochs', DASH))} ({compact(config.get('freeze_epochs', DASH))})",
                rates or DASH,
                minutes(data.get("seconds")),
                load_range(data),
                machine(data.get("machine")),
            ]
        )
    return [
        "## Fine-tuning: the whole command (`benchmarks/finetune_run.py`)",
        "",
        "`reslab train --weights W --preset finetune` on a folder of JPEG photos, timed end to",
        "end (process start, weights, both phases, every evaluation, the run folder's files).",
        "",
        *table(headers, rows),
        "",
    ]


def tensorboard_cost(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "model", "epochs", "steps", "run", "in the hook", "share"]
    headers += ["per step", "per epoch", "load before / after", "machine"]
    rows = []
    for path, data in files:
        seconds = data.get("seconds_by_method") or {}
        steps, epochs = data.get("steps") or 0, data.get("epochs") or 0
        loads = [get(data, key, 0) for key in ("load_average_before", "load_average_after")]
        rows.append(
            [
                link(path),
                compact(data.get("model", DASH)),
                compact(epochs),
                compact(steps),
                minutes(data.get("run_seconds")),
                f"{number(data.get('hook_seconds'), 2)} s",
                percent(data.get("hook_share")),
                f"{number(1000 * seconds['after_step'] / steps, 2)} ms" if steps else DASH,
                f"{number(seconds['after_epoch'] / epochs, 2)} s" if epochs else DASH,
                " / ".join(number(load, 1) if load else DASH for load in loads),
                machine(data.get("machine")),
            ]
        )
    return [
        "## Logging: TensorBoard's cost (`benchmarks/tensorboard_cost.py`)",
        "",
        "The time a training run spends in its TensorBoard hook (writer, per-step scalars, the",
        "first batch's images, the per-epoch scalars and confusion figure), as a share of the",
        "same run's wall time; the load average is the 1-minute one of the shared machine.",
        "",
        *table(headers, rows),
        "",
    ]


def study_time(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "degradation", "shortcuts", "responses", "ResNet-56 s/step"]
    headers += ["channels_last speedup", "load avg start, end", "machine"]
    rows = []
    for path, data in files:
        estimate = data.get("estimated_minutes") or {}
        step = get(data, "seconds", "resnet56 small", "step")
        cifar = get(data, "seconds", "resnet56 cifar", "step")
        # one-minute load averages; the start is the file's own key, taken before any work
        load = [get(data, "load_average_start", 0), get(data, "machine", "load_average_end", 0)]
        rows.append(
            [
                link(path),
                *(
                    f"{number(estimate.get(k), 0)} min"
                    for k in ("degradation", "shortcuts", "responses")
                ),
                f"{number(step, 3)} (small stem), {number(cifar, 3)} (cifar)",
                f"{number(data.get('channels_last_speedup_resnet20'), 2)}x",
                load_averages(load),
                machine(data.get("machine")),
            ]
        )
    return [
        "## Studies: estimated time of the default budgets (`benchmarks/study_time.py`)",
        "",
        "Estimates, not runs: CPU seconds of one thread per training step and per 1,000",
        "evaluated images, timed on a few steps of each network a default budget trains, times",
        "the budget's steps; on an idle core, its wall time. The load average says how shared",
        "the machine was.",
        "",
        *table(headers, rows),
        "",
    ]


def study_outcome(data: dict) -> str:
    """What a study run found, claim by claim: the paper's claims for degradation, the
    readings for responses, whether the paper's best variant was best for shortcuts."""
    lines = []
    for claim in data.get("claims") or []:
        verdict = "holds" if claim.get("held") else "does NOT hold"
        deep, shallow = (claim.get(k) for k in ("deep", "shallow"))
        numbers = " vs ".join(
            f"{number(100 * v, 2)}%" if isinstance(v, int | float) else DASH
            for v in (deep, shallow)
        )
        lines.append(f"{claim.get('text', '?')}: {verdict} ({numbers})")
    for found in data.get("reading") or []:
        verdict = "holds" if found.get("holds") else "does NOT hold"
        numbers = f"{number(found.get('residual'), 3)} vs {number(found.get('plain'), 3)}"
        lines.append(f"{found.get('finding', '?')}: {verdict} ({numbers})")
    for found in data.get("orderings_found") or []:
        measured = found.get("measured") or ["?"]
        verdict = (
            "best here" if found.get("paper_best_holds") else f"not best (best: {measured[0]})"
        )
        lines.append(
            f"{found.get('group')}, ResNet-{found.get('depth')}: paper's best "
            f"{found.get('paper_best')} {verdict}; measured {' < '.join(measured)}"
        )
    return "<br>".join(lines) or DASH


def studies(files: list[tuple[Path, dict]]) -> list[str]:
    headers = ["result file", "study", "depths", "epochs", "training images", "seeds"]
    headers += ["wall time", "what it found", "load avg start, end", "machine"]
    rows = []
    for path, data in files:
        config = data.get("config") or {}
        load = [get(data, "machine", "load_average_start", 0)]
        load.append(get(data, "machine", "load_average_end", 0))
        rows.append(
            [
                link(path),
                path.stem.split("-")[1],
                compact(config.get("depths", DASH)),
                compact(config.get("epochs", DASH)),
                number(data.get("train_size"), 0),
                compact(config.get("seeds", DASH)),
                f"{number(data.get('minutes'), 1)} min",
                study_outcome(data),
                load_averages(load),
                machine(data.get("machine")),
            ]
        )
    return [
        "## Studies: runs (`reslab study ... --out benchmarks/results/study-NAME-TIME.json`)",
        "",
        "Each row is one run of a training study at the budget shown; what it found is on the",
        "mean over its seeds ([Studies](studies.md) says how each is measured). The wall time",
        "is the whole command's on the machine named, whose load average says how shared it was.",
        "",
        *table(headers, rows),
        "",
    ]


SECTIONS: list[tuple[str, Callable[[list[tuple[Path, dict]]], list[str]]]] = [
    ("fashion_mnist-*.json", classification),
    ("seed_screen-*.json", seed_screen),
    ("detection-train-*.json", detection_train),
    ("detection-nms-*.json", detection_nms),
    ("detection-infer-*.json", detection_infer),
    ("detection-plan-*.json", detection_plan),
    ("bench-*.json", bench),
    ("train_step-*.json", train_step),
    ("kernels-*.json", kernels),
    ("serve_load-*.json", serve_load),
    ("transfer-*.json", transfer),
    ("finetune_speed-*.json", finetune_speed),
    ("finetune_run-*.json", finetune_run),
    ("tensorboard-*.json", tensorboard_cost),
    ("study_time-*.json", study_time),
    ("study-*.json", studies),
]


def render() -> str:
    lines = [
        "# Results",
        "",
        "<!-- Generated by benchmarks/report.py from benchmarks/results/*.json; do not edit. -->",
        "",
        "Every measured result in `benchmarks/results/`, one row per run, generated by",
        "`python benchmarks/report.py` (`make docs` and the tests check it is current). Wall times",
        "compare only on one machine; the machine column says which ran what. What each",
        "experiment tried and concluded is in [Experiments](experiments.md).",
        "",
    ]
    for pattern, section in SECTIONS:
        files = load(pattern)
        if files:
            lines += section(files)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    parser.add_argument("--out", type=Path, default=PAGE, help="page to write or check")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
