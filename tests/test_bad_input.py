"""Bad input from a user: one clear line on stderr, exit status 2, no traceback, nothing lost.

One test per case the reliability issue lists; COCO annotation errors are covered in
tests/data/test_coco.py and Fashion-MNIST's locator in tests/data/test_fashion_mnist.py, and
are repeated here through the command line.
"""

from __future__ import annotations

import collections
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.cli import main
from reslab.data import fashion_mnist
from reslab.engine.checkpoint import load_checkpoint, make_payload, save_checkpoint
from reslab.errors import ReslabError
from reslab.models import create_model

TINY = [
    "--model=resnet20", "--width=0.25", "--image-size=16", "--epochs=1", "--batch-size=8",
    "--no-verify", "--threads=1", "--processes=1",
]  # fmt: skip


def fails_cleanly(capsys, argv, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("reslab: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def run(fake_fmnist, tmp_path, capsys):
    folder = tmp_path / "run"
    assert main(["train", *TINY, f"--data-dir={fake_fmnist}", f"--out={folder}"]) == 0
    capsys.readouterr()
    return folder


def test_unknown_model_lists_close_matches(capsys):
    fails_cleanly(capsys, ["train", "--model=resnet5O"], "resnet50", "did you mean")


@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--epochs=-1", "--epochs"),
        ("--batch-size=0", "--batch-size"),
        ("--lr=nan", "--lr"),
        ("--width=nan", "--width must be a finite number"),
        ("--width=0", "--width must be > 0"),
        ("--save-every=-5", "--save-every"),
        ("--max-minutes=-1", "--max-minutes"),
    ],
)
def test_out_of_range_flags(capsys, flag, needle):
    fails_cleanly(capsys, ["train", flag], needle)


def test_a_batch_larger_than_the_training_set_is_one_step_with_a_note(
    fake_fmnist, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--batch-size=64", f"--data-dir={fake_fmnist}", f"--out={out}"]
    assert main(argv) == 0
    assert "note: --batch-size 64 is more than the 40 training images" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["step"] == 1


def test_run_folder_is_never_overwritten_without_force(run, fake_fmnist, capsys):
    before = (run / "last.pt").read_bytes()
    fails_cleanly(
        capsys, ["train", *TINY, f"--data-dir={fake_fmnist}", f"--out={run}"], "--force", str(run)
    )
    assert (run / "last.pt").read_bytes() == before


def test_output_folder_that_cannot_be_written(fake_fmnist, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fails_cleanly(
        capsys,
        ["train", *TINY, f"--data-dir={fake_fmnist}", f"--out={blocker / 'run'}"],
        "cannot write the run folder",
        "--out",
    )


def test_missing_fashion_mnist_names_the_three_ways(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setattr(
        "torchvision.datasets.FashionMNIST",
        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")),
    )
    fails_cleanly(
        capsys,
        ["train", *TINY, f"--data-dir={tmp_path / 'empty'}"],
        "apt-get install dataset-fashion-mnist",
        "--data-dir",
        "download",
    )


def test_fashion_mnist_file_of_the_wrong_size(fake_fmnist, capsys):
    labels = fake_fmnist / fashion_mnist.FILES[("train", "labels")][0]
    labels.write_bytes(labels.read_bytes()[:-3])
    fails_cleanly(capsys, ["train", *TINY, f"--data-dir={fake_fmnist}"], labels.name, "truncated")


def test_corrupt_and_non_image_files_in_predict(run, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("just text")
    fails_cleanly(capsys, ["predict", str(run), str(bad)], str(bad), "not a readable image")
    truncated = tmp_path / "cut.png"
    Image.new("L", (28, 28), 7).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:40])
    fails_cleanly(capsys, ["predict", str(run), str(truncated)], str(truncated))
    missing = str(tmp_path / "missing.png")
    fails_cleanly(capsys, ["predict", str(run), missing], f"image {missing} does not exist")
    fails_cleanly(capsys, ["predict", str(run), str(tmp_path)], "is a folder", "*.png")


def test_wrong_channels_and_size_are_converted_with_a_notice(run, tmp_path, capsys):
    Image.new("RGB", (90, 40), (200, 10, 10)).save(tmp_path / "colour.jpg")
    assert main(["predict", str(run), str(tmp_path / "colour.jpg")]) == 0
    captured = capsys.readouterr()
    assert (
        "note:" in captured.err
        and "RGB 90x40" in captured.err
        and "grayscale 28x28" in (captured.err)
    )
    assert captured.out.startswith(str(tmp_path / "colour.jpg"))


def test_many_converted_images_get_one_notice_not_one_each(run, tmp_path, capsys):
    paths = [str(tmp_path / "ok.png")]
    Image.new("L", (28, 28), 9).save(paths[0])  # already as trained: no notice
    for i, size in enumerate([(30, 30), (640, 480), (90, 40), (28, 28)]):
        paths.append(str(tmp_path / f"photo{i}.jpg"))
        Image.new("RGB", size, (10 * i, 0, 0)).save(paths[-1])
    assert main(["predict", str(run), *paths]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 4 of 5 images are not grayscale 28x28 (mode RGB, size 28x28 to 640x480); "
        "each was converted to grayscale 28x28 as the training images were"
    ]
    assert [line.split(":")[0] for line in captured.out.splitlines()] == paths


def test_image_folder_empty_or_with_an_empty_class(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails_cleanly(capsys, ["train", *TINY, f"--data={tmp_path / 'empty'}"], "no class folders")
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "pets" / "cat" / "a.png")
    fails_cleanly(capsys, ["train", *TINY, f"--data={tmp_path / 'pets'}"], "dog", "no images")


def test_corrupt_file_in_an_image_folder_skips_or_stops_with_strict(tmp_path, capsys):
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    (tmp_path / "pets" / "dog" / "bad.png").write_bytes(b"\x89PNG broken")
    args = ["train", *TINY, f"--data={tmp_path / 'pets'}", "--val-fraction=0.3", "--workers=0"]
    assert main([*args, f"--out={tmp_path / 'ok'}"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable file(s)" in out and "bad.png" in out
    fails_cleanly(capsys, [*args, "--strict", f"--out={tmp_path / 'strict'}"], "bad.png")


def test_checkpoint_of_another_model(run, tmp_path, capsys):
    payload = load_checkpoint(run / "last.pt")
    payload["model"] = {"name": "resnet56", "kwargs": payload["model"]["kwargs"]}
    save_checkpoint(tmp_path / "other.pt", payload)
    fails_cleanly(capsys, ["eval", str(tmp_path / "other.pt")], "do not fit resnet56")
    weights_only = make_payload(create_model("resnet20", width=0.25))
    save_checkpoint(tmp_path / "bare.pt", weights_only)
    fails_cleanly(capsys, ["train", f"--resume={tmp_path / 'bare.pt'}"], "cannot resume")


def test_truncated_checkpoint_and_code_in_a_checkpoint(run, tmp_path, capsys):
    data = (run / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    fails_cleanly(capsys, ["eval", str(tmp_path / "cut.pt")], "cut.pt", "truncated")
    torch.save({"format": "reslab-checkpoint", "hook": torch.nn.ReLU()}, tmp_path / "code.pt")
    fails_cleanly(capsys, ["predict", str(tmp_path / "code.pt"), "x.png"], "refused", "code")
    # the pre-zip format is a bare pickle; code in it is refused the same way
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"hook": collections.Counter()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's protocol warning would be a second message
        fails_cleanly(capsys, ["eval", str(tmp_path / "legacy.pt")], "refused", "code")


def test_a_file_that_is_no_checkpoint_is_not_called_code(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("# a README, given by mistake\n")
    err = fails_cleanly(
        capsys, ["eval", str(tmp_path / "notes.md")], "notes.md", "not a PyTorch checkpoint"
    )
    assert "refused" not in err
    (tmp_path / "empty.pt").write_bytes(b"")
    fails_cleanly(capsys, ["eval", str(tmp_path / "empty.pt")], "empty.pt", "truncated")


def test_coco_json_with_bad_boxes_through_the_command(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 30, 30]}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    fails_cleanly(
        capsys,
        [
            "detect", "train", f"--images={images}", f"--annotations={tmp_path / 'ann.json'}",
            "--backbone=resnet18", "--width=0.25", f"--out={tmp_path / 'det'}",
        ],
        "outside",
    )  # fmt: skip


def test_a_folder_with_one_class_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "cat" / "a.png")
    out = tmp_path / "run"
    argv = ["train", *TINY, f"--data={tmp_path / 'one'}", f"--out={out}"]
    fails_cleanly(capsys, argv, "one class folder (cat)", "two or more")
    assert not out.exists()


def test_16_bit_and_cmyk_images_in_a_folder_are_read_not_skipped(tmp_path, capsys):
    from reslab.data.folders import open_image

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    deep = tmp_path / "pets" / "cat" / "deep.png"
    Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(deep)  # 16-bit grey
    cmyk = tmp_path / "pets" / "dog" / "print.jpg"
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(cmyk)  # red in print colours
    assert Image.open(deep).mode.startswith("I") and Image.open(cmyk).mode == "CMYK"
    args = ["train", *TINY, f"--data={tmp_path / 'pets'}", "--val-fraction=0.3", "--workers=0"]
    assert main([*args, f"--out={tmp_path / 'ok'}"]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert open_image(deep, 3, 12).unique().tolist() == [round(40000 * 255 / 65535)]
    red = open_image(cmyk, 3, 12)[:, 6, 6].tolist()
    assert red[0] > 200 and max(red[1:]) < 60


def bomb_png(path) -> None:
    """A PNG that declares 60000x60000 pixels in a few bytes: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
    path.write_bytes(png + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_an_unreadable_file(run, tmp_path, capsys):
    from reslab.data.folders import scan

    bomb_png(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 1024
    fails_cleanly(capsys, ["predict", str(run), str(tmp_path / "bomb.png")], "bomb.png")
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        Image.new("RGB", (12, 12)).save(tmp_path / "pets" / name / "0.png")
    bomb_png(tmp_path / "pets" / "dog" / "bomb.png")
    skipped = []
    files, _ = scan(tmp_path / "pets", skipped=skipped)
    assert len(files) == 2 and [p.name for p in skipped] == ["bomb.png"]
    with pytest.raises(ReslabError, match="bomb.png"):
        scan(tmp_path / "pets", strict=True)


def test_detect_train_resume_on_a_classification_run_names_the_right_command(
    tmp_path, write_bars, capsys
):
    run = tmp_path / "run"
    save_checkpoint(run / "last.pt", make_payload(create_model("resnet20", width=0.25)))
    bars = tmp_path / "bars"
    bars.mkdir()
    write_bars(bars, count=4)
    argv = ["detect", "train", "--resume", f"--out={run}", f"--images={bars}"]
    argv += [f"--annotations={bars / 'ann.json'}", "--processes=1"]
    fails_cleanly(capsys, argv, "not a detector", f"reslab train --resume {run}")


def test_more_threads_than_cores_are_capped_with_a_note(fake_fmnist, capsys):
    from rich.console import Console

    from reslab.engine.config import TrainConfig
    from reslab.engine.distributed import World, cpu_cores
    from reslab.engine.state import prepare

    config = TrainConfig(data_dir=str(fake_fmnist), verify=False, threads=64)
    try:
        prepare(config, World(), Console())
        assert torch.get_num_threads() == min(64, cpu_cores())
    finally:
        torch.set_num_threads(1)
    assert f"--threads 64 is more than the {cpu_cores()} core(s)" in capsys.readouterr().out
