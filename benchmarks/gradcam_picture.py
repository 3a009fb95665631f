"""docs/gradcam.png: Grad-CAM of a Fashion-MNIST classifier on one test image of each class,
through `reslab explain` on image files as a user would run it.

    .venv/bin/python benchmarks/gradcam_picture.py [--run RUN]

Without --run it first trains a quarter-width ResNet-20 on 16-pixel images for one epoch
(TRAIN below) into build/gradcam/run; the picture's title names the run's model, epochs and
test accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from reslab.data import fashion_mnist
from reslab.engine.plots import pyplot, save_figure

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "gradcam"
# a small model that trains in minutes on one core and reaches about 77% in its one epoch
TRAIN = (
    "--model=resnet20", "--width=0.25", "--image-size=16", "--epochs=1", "--batch-size=8",
    "--threads=1", "--processes=1",
)  # fmt: skip


def reslab(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "reslab", *args], check=True, capture_output=True, text=True
    )
    return done.stdout


def describe(run: Path) -> str:
    """The run's model, epochs and last test accuracy, from its config and metrics."""
    config = json.loads((run / "config.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    kwargs = ", ".join(f"{k} {v}" for k, v in config["model_kwargs"].items())
    return (
        f"{config['model']} ({kwargs}), {last['epoch']} epoch(s), "
        f"{config.get('image_size') or 28} px, test accuracy {100 * last['test_acc']:.2f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a classification run folder (default: train one)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "gradcam.png"))
    args = parser.parse_args()
    run = args.run
    if run is None:
        run = str(WORK / "run")
        reslab("train", *TRAIN, "--out", run, "--force")
    test = fashion_mnist.load("test")
    paths = []
    for label, name in enumerate(fashion_mnist.CLASSES):
        index = int((test.labels == label).nonzero()[0])  # the first test image of the class
        path = WORK / f"{label}-{name.replace('/', '-').replace(' ', '-').lower()}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[index].numpy(), "L").save(path)
        paths.append(path)
    lines = reslab("explain", run, *map(str, paths)).splitlines()
    plt = pyplot()
    fig, axes = plt.subplots(2, len(paths), figsize=(1.6 * len(paths), 4.0), layout="constrained")
    for column, (path, line) in enumerate(zip(paths, lines, strict=True)):
        explained = line.split(": ", 1)[1]  # "<class> <probability>%"
        true = fashion_mnist.CLASSES[column]
        axes[0, column].imshow(Image.open(path), cmap="gray", vmin=0, vmax=255)
        axes[0, column].set_title(true, fontsize=8)
        axes[1, column].imshow(Image.open(path.with_name(f"{path.stem}.gradcam.png")))
        axes[1, column].set_title(f"predicted\n{explained}", fontsize=8)
        for ax in axes[:, column]:
            ax.axis("off")
    fig.suptitle(
        f"Grad-CAM of the predicted class (bottom) on Fashion-MNIST test images (top: true "
        f"class); {describe(Path(run))}",
        fontsize=9,
    )
    save_figure(fig, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
