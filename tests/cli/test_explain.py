"""`reslab explain`, `predict --explain` and `eval --top-losses`: pictures of what a trained
model does, and the bad inputs each answered in one line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from reslab.cli import main

TINY = [
    "--model=resnet20", "--width=0.25", "--image-size=16", "--epochs=1", "--batch-size=8",
    "--no-verify", "--threads=1", "--processes=1", "--no-tta",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from reslab.data import fashion_mnist

    root = tmp_path_factory.mktemp("explain")
    data = root / "fmnist"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        images = torch.randint(0, 255, (16, 28, 28), generator=g, dtype=torch.uint8)
        name = fashion_mnist.FILES[(split, "images")][0]
        fashion_mnist.write_idx(data / f"{name}.gz", images)
        fashion_mnist.write_idx(
            data / fashion_mnist.FILES[(split, "labels")][0], torch.arange(16) % 10
        )
    system = fashion_mnist.SYSTEM_DIR
    fashion_mnist.SYSTEM_DIR = root / "no-system-dir"  # the real data set is never read
    try:
        assert main(["train", *TINY, f"--data-dir={data}", f"--out={root / 'run'}"]) == 0
    finally:
        fashion_mnist.SYSTEM_DIR = system
    return root / "run"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "shirt.png"
    Image.new("L", (28, 28), 90).save(path)
    return path


def test_explain_writes_an_overlay_beside_each_image(run, image, tmp_path, capsys):
    other = tmp_path / "photo.jpg"
    Image.new("RGB", (60, 40), (200, 30, 30)).save(other)
    capsys.readouterr()
    assert main(["explain", str(run), str(image), str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'shirt.gradcam.png'}: ") and lines[0].endswith("%")
    small, photo = (Image.open(tmp_path / n) for n in ("shirt.gradcam.png", "photo.gradcam.png"))
    assert small.size == (224, 224) and photo.size == (224, 149)  # enlarged, aspect kept
    assert main(["explain", str(run), str(image), "--class", "Bag", "--layer", "layer2"]) == 0
    assert capsys.readouterr().out.split(": ")[1].startswith("Bag ")
    assert main(["predict", str(run), str(image), "--explain"]) == 0
    out = capsys.readouterr().out.splitlines()
    top = out[0].split(": ")[1].split(" ")[0]
    assert out[1].startswith(f"{tmp_path / 'shirt.gradcam.png'}: {top} ")


def fails(capsys, argv, *needles) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reslab: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line_and_writes_nothing(run, image, tmp_path, capsys):
    missing = tmp_path / "none.pt"
    fails(capsys, ["explain", str(missing), str(image)], f"checkpoint {missing} does not exist")
    bad = tmp_path / "notes.png"
    bad.write_text("just text")
    fails(capsys, ["explain", str(run), str(image), str(bad)], str(bad), "not a readable image")
    assert not (tmp_path / "shirt.gradcam.png").exists()  # the good image's map is not written
    fails(capsys, ["explain", str(run), str(image), "--class", "Cat"], "--class 'Cat'", "Bag")
    fails(capsys, ["explain", str(run), str(image), "--layer", "layer7"], "layer1, layer2")
    fails(capsys, ["predict", str(run), str(image), "--layer", "layer2"], "add --explain")
    assert not (tmp_path / "shirt.gradcam.png").exists()


def test_eval_draws_the_top_losses_in_the_run_folder(run, capsys, monkeypatch):
    from reslab.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", run.parent / "no-system-dir")
    assert main(["eval", str(run / "last.pt"), "--top-losses", "4"]) == 0
    assert f"top losses: {run / 'top_losses.png'}" in capsys.readouterr().out
    assert Image.open(run / "top_losses.png").size[0] > 400
    assert main(["eval", str(run), "--top-losses", "-1"]) == 2
    assert "--top-losses must be a whole number >= 0" in capsys.readouterr().err
