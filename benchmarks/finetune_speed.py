"""Fine-tuning speed at 224 px: decoding against training, frozen and unfrozen, cached and not.

    .venv/bin/python benchmarks/finetune_speed.py                 # ResNet-50, batch 16
    .venv/bin/python benchmarks/finetune_speed.py --model resnet18 --steps 2

Writes JPEG photos (500x375, the size of a typical web photo) to a temporary folder, then
measures in one process, so that every ratio compares numbers from the same minutes:

- decoding: images/s of reslab's folder reader (PIL decode, RGB, resize to 224) and of
  torchvision.io's JPEG decoder with a tensor resize, each on one core;
- a frozen phase of a real run (``fit``, the finetune preset's rates) on a folder of photos,
  with and without ``--cache-features``: the saving the cache makes;
- training at 224 px, images/s of full steps (forward, backward, update) of reslab's model and
  of torchvision's model of the same depth: unfrozen; frozen (the body without gradients,
  batch norm in eval mode, the head trained); frozen on cached features (the head alone, the
  body's features computed once: what one pass of the body costs is timed too).

Writes benchmarks/results/finetune_speed-<time>.json with the machine and the load average at
the start and end (the machine may be shared), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from rich.console import Console
from torchvision.io import ImageReadMode, decode_image, read_file

from reslab.bench import machine_info
from reslab.data.folders import open_image
from reslab.engine.config import build_config
from reslab.engine.finetune import set_frozen
from reslab.engine.train import fit
from reslab.models import create_model

RESULTS = Path(__file__).parent / "results"
SIZE = 224


def write_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of smooth random colour fields with noise, 500x375."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        base = torch.rand(3, 12, 16, generator=g)
        image = F.interpolate(base[None], size=(375, 500), mode="bicubic")[0]
        image = (image + 0.08 * torch.randn(image.shape, generator=g)).clamp(0, 1)
        pixels = (image * 255).byte().permute(1, 2, 0).numpy()
        path = folder / f"{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def decode_rate(paths: list[Path], read) -> float:
    """Images/s of ``read(path)`` on one core, after one untimed image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    read(paths[0])
    start = time.perf_counter()
    for path in paths:
        read(path)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(paths) / seconds


def torchvision_read(path: Path) -> torch.Tensor:
    image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    x = F.interpolate(image[None].float(), size=(SIZE, SIZE), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).byte()[0]


def freeze_torchvision(model: torch.nn.Module) -> None:
    """The same frozen phase on torchvision's model: only ``fc`` trains, norms in eval mode."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()


def step_rate(model, x, y, steps: int) -> float:
    """Images/s of SGD steps on (x, y) after one untimed step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - start)


@torch.no_grad()
def forward_rate(forward, x, steps: int) -> float:
    forward(x)
    start = time.perf_counter()
    for _ in range(steps):
        forward(x)
    return steps * len(x) / (time.perf_counter() - start)


def training_rates(name: str, batch: int, steps: int, classes: int) -> dict:
    """Images/s of reslab's and torchvision's model: unfrozen, frozen, and the cached head."""
    x = torch.randn(batch, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    rates = {}
    for library in ("reslab", "torchvision"):
        torch.manual_seed(0)
        if library == "reslab":
            model = create_model(name, num_classes=classes)
        else:
            model = getattr(torchvision.models, name)(num_classes=classes)
        model = model.to(memory_format=torch.channels_last).train()
        unfrozen = step_rate(model, x, y, steps)
        if library == "reslab":
            set_frozen(model, True, train_bn=False)
        else:
            freeze_torchvision(model)
        frozen = step_rate(model, x, y, steps)
        body = torch.nn.Sequential(*list(model.children())[:-1]).eval()  # to the pooled features
        features = forward_rate(body, x, steps)
        pooled = body(x).flatten(1).detach()  # (N, C)
        head = step_rate(model.fc, pooled, y, 50)
        rates[library] = {
            "unfrozen": unfrozen,
            "frozen": frozen,
            "body_forward": features,
            "cached_head": head,
        }
    return rates


def frozen_phase_seconds(model: str, folder: Path, images: int, epochs: int, batch: int) -> dict:
    """Wall seconds of ``epochs`` frozen epochs of ``reslab.engine.train.fit`` on a folder of
    ``images`` photos in two classes (and an eighth as many held out), with and without
    ``cache_features``; no augmentation, so both train the head on the same inputs."""
    for seed, name in enumerate(("a", "b")):
        for split, count in (("train", images // 2), ("val", images // 16)):
            (folder / split / name).mkdir(parents=True)
            for path in write_photos(folder / split / name, count, seed + 10 * len(split)):
                path.rename(path.with_name(f"{name}{path.name}"))
    seconds = {}
    for cache in (False, True):
        config = build_config(
            "finetune",
            model=model,
            data=str(folder),
            image_size=SIZE,
            epochs=epochs,
            freeze_epochs=epochs,
            cache_features=cache,
            augment=False,
            tta=False,
            precision="fp32",
            batch_size=batch,
            eval_batch_size=batch,
            out=str(folder / f"run-{cache}"),
        )
        result = fit(config, console=Console(file=open(os.devnull, "w")))
        seconds["cached" if cache else "uncached"] = result.seconds
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a depth torchvision also has")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--images", type=int, default=64, help="JPEGs decoded per reader")
    parser.add_argument("--classes", type=int, default=37)
    parser.add_argument(
        "--folder-images", type=int, default=256, help="training photos of the frozen-phase run"
    )
    parser.add_argument("--frozen-epochs", type=int, default=3)
    args = parser.parse_args()
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.images)
        decode = {
            "pil_open_image": decode_rate(paths, lambda p: open_image(p, 3, SIZE)),
            "torchvision_io": decode_rate(paths, torchvision_read),
        }
    rates = training_rates(args.model, args.batch, args.steps, args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        frozen = frozen_phase_seconds(
            args.model, Path(tmp), args.folder_images, args.frozen_epochs, args.batch
        )
    result = {
        "task": "finetune_speed",
        "model": args.model,
        "image_size": SIZE,
        "batch_size": args.batch,
        "timed_steps": args.steps,
        "decode_img_per_s_one_core": decode,
        "train_img_per_s": rates,
        "frozen_phase": {
            "images": args.folder_images,
            "epochs": args.frozen_epochs,
            "seconds": frozen,
            "saving": 1 - frozen["cached"] / frozen["uncached"],
        },
        "machine": machine,
        "load_average_end": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"finetune_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"decode, one core: PIL {decode['pil_open_image']:.0f} img/s, torchvision.io "
        f"{decode['torchvision_io']:.0f} img/s"
    )
    print(f"{'train img/s':<14}{'unfrozen':>10}{'frozen':>10}{'body fwd':>10}{'cached':>10}")
    for library, r in rates.items():
        print(f"{library:<14}" + "".join(f"{r[k]:>10.1f}" for k in r))
    print(
        f"{args.frozen_epochs} frozen epochs on {args.folder_images} photos (fit): "
        f"{frozen['uncached']:.1f} s, with --cache-features {frozen['cached']:.1f} s"
    )
    print(f"load average {machine['load_average_start']} -> {result['load_average_end']}; {out}")


if __name__ == "__main__":
    main()
