"""Pretrained weights: torchvision's cache, state dicts, safetensors, timm and reslab files,
fitted to other heads and input channels; every bad file a one-line error."""

from __future__ import annotations

import argparse
from urllib.error import URLError

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

import reslab
from reslab.cli import main
from reslab.data.transforms import InputSpec
from reslab.engine.checkpoint import make_payload, save_checkpoint
from reslab.engine.config import build_config, config_from_flags
from reslab.errors import ReslabError
from reslab.weights import adapt_first_conv, load_weights


def make_folder(root, classes=("cat", "dog"), per_class=8):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), (200 * c, 20 * i, 90)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def offline(monkeypatch):
    """No download can happen: torch.hub's downloader fails as it does without a network."""

    def refuse(url, *args, **kwargs):
        raise URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch, offline):
    """An empty $TORCH_HOME whose hub/checkpoints folder is torchvision's cache."""
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "checkpoints"


def test_imagenet_loads_from_the_torch_home_cache_without_network(torch_home, tmp_path):
    # the file name in ResNet50_Weights.IMAGENET1K_V2's URL; torch.hub checks a hash only
    # when it downloads, so a random state dict placed there loads as the real one would
    saved = torchvision.models.resnet50().state_dict()
    torch.save(saved, torch_home / "resnet50-11ad3fa6.pth")
    pets = make_folder(tmp_path / "pets")
    out = tmp_path / "run"
    code = main(
        ["train", "--data", str(pets), "--model", "resnet50", "--weights", "imagenet"]
        + ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--lr", "1e-9"]
        + ["--workers", "0", "--precision", "fp32", "--out", str(out)]
    )
    assert code == 0
    payload = torch.load(out / "last.pt", weights_only=True)
    assert "IMAGENET1K_V2" in payload["weights"]["source"]
    assert payload["config"]["crop"] == "resized" and payload["config"]["model_kwargs"] == {}
    # 232/224 of the crop, as torchvision's V2 evaluation resizes before its 224 crop
    assert payload["input"]["resize"] == round(32 * 232 / 224)
    # a learning rate of 1e-9 leaves the loaded weights where they were, not at random ones
    got = payload["state_dict"]["layer3.2.conv2.weight"]
    assert torch.allclose(got, saved["layer3.2.conv2.weight"], atol=1e-6)
    assert payload["state_dict"]["fc.weight"].shape == (2, 2048)


def test_missing_cache_file_names_the_file_and_folder(torch_home):
    with pytest.raises(ReslabError) as error:
        reslab.create_model("resnet18", weights="IMAGENET1K_V1")
    message = str(error.value)
    assert f"resnet18-f37072fd.pth in {torch_home}" in message and "\n" not in message
    with pytest.raises(ReslabError, match="has IMAGENET1K_V1 for resnet18"):
        reslab.create_model("resnet18", weights="IMAGENET1K_V2")
    with pytest.raises(ReslabError, match="not preact_resnet50"):
        reslab.create_model("preact_resnet50", weights="imagenet")


def test_safetensors_state_dict_with_a_new_head(tmp_path):
    # without the batch norms' step counters, as torchvision's IMAGENET1K_V1 files are
    saved = torchvision.models.resnet18().state_dict()
    kept = {k: v.contiguous() for k, v in saved.items() if "num_batches_tracked" not in k}
    path = tmp_path / "resnet18.safetensors"
    save_file(kept, str(path))
    lines = []
    model, info = load_weights("resnet18", path, num_classes=3, say=lines.append)
    assert torch.equal(model.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 3
    assert lines == [
        "the weights' head has 1000 classes; a new one for 3 classes starts from random weights"
    ]
    assert (info.size, info.resize, info.channels) == (224, 256, 3)


def test_timm_training_checkpoint_is_unwrapped(tmp_path):
    # what timm's train.py saves: the model it trained, the weights under state_dict (keys
    # from DistributedDataParallel begin with module.), and its argparse options
    saved = torchvision.models.resnet34().state_dict()
    checkpoint = {
        "epoch": 5,
        "arch": "resnet34.a1_in1k",
        "state_dict": {f"module.{k}": v for k, v in saved.items()},
        "version": 2,
        "args": argparse.Namespace(model="resnet34", lr=0.1),
    }
    path = tmp_path / "checkpoint-5.pth.tar"
    torch.save(checkpoint, path)
    model = reslab.create_model("resnet34", weights=path, say=lambda _: None)
    assert torch.equal(model.layer3[5].conv1.weight, saved["layer3.5.conv1.weight"])
    assert torch.equal(model.fc.weight, saved["fc.weight"])  # 1000 classes: its head is kept
    # `reslab train --weights` without --model builds the architecture the checkpoint names
    assert build_config("default", weights=str(path)).model == "resnet34"
    # a head-less export (timm's reset_classifier(0)) gets a new head, and says so
    torch.save({k: v for k, v in saved.items() if not k.startswith("fc.")}, path)
    lines = []
    model = reslab.create_model("resnet34", weights=path, num_classes=5, say=lines.append)
    assert torch.equal(model.layer3[5].conv1.weight, saved["layer3.5.conv1.weight"])
    assert lines == [
        "the weights have no classifier head; a new one for 5 classes starts from random weights"
    ]


def test_reslab_run_folder_from_one_channel_to_rgb(tmp_path):
    net = reslab.create_model("resnet18", stem="small", width=0.25, in_channels=1, num_classes=10)
    spec = InputSpec(28, 28, 1, (0.286,), (0.353,), "small")
    classes = [f"c{i}" for i in range(10)]
    payload = make_payload(net, classes=classes, input=spec.to_dict())
    save_checkpoint(tmp_path / "fmnist" / "last.pt", payload)
    config = build_config("default", weights=str(tmp_path / "fmnist"), data="x")
    assert config.model_kwargs == {"stem": "small", "width": 0.25}
    assert (config.image_size, config.resize, config.crop) == (28, 0, "pad")
    # `reslab train --weights` without --preset fine-tunes, with the checkpoint's network
    config, _, _ = config_from_flags(None, {"weights": str(tmp_path / "fmnist"), "data": "x"})
    assert (config.preset, config.model, config.plan_data) == ("finetune", "resnet18", [])
    lines = []
    model, info = load_weights(
        "resnet18", tmp_path / "fmnist", num_classes=2, in_channels=3, say=lines.append
    )
    assert model.spec["kwargs"]["stem"] == "small" and model.conv1.in_channels == 3
    assert torch.allclose(model.conv1.weight, net.conv1.weight.repeat(1, 3, 1, 1) / 3)
    assert torch.equal(model.layer2[0].downsample[0].weight, net.layer2[0].downsample[0].weight)
    assert len(lines) == 2 and "repeated over" in lines[0] and "10 classes" in lines[1]
    assert info.mean == (0.286,) and info.classes == tuple(classes)


def test_first_conv_adapted_keeps_the_response_to_alike_channels():
    conv = torch.nn.functional.conv2d
    weight = torch.randn(8, 3, 3, 3)
    grey = torch.rand(1, 1, 9, 9)
    rgb = conv(grey.repeat(1, 3, 1, 1), weight)
    assert torch.allclose(conv(grey, adapt_first_conv(weight, 1)), rgb, atol=1e-5)
    assert torch.allclose(
        conv(grey.repeat(1, 6, 1, 1), adapt_first_conv(weight, 6)), rgb, atol=1e-5
    )
    one = torch.randn(8, 1, 3, 3)
    assert torch.allclose(
        conv(grey.repeat(1, 3, 1, 1), adapt_first_conv(one, 3)), conv(grey, one), atol=1e-5
    )
    assert adapt_first_conv(weight, 5).shape == (8, 5, 3, 3)


def test_another_architecture_is_one_line_naming_the_tensors(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ReslabError) as error:
        reslab.create_model("resnet18", weights=path)
    message = str(error.value)
    assert "does not fit resnet18" in message and "\n" not in message
    # the first tensor that differs, in the model's order, with both shapes
    assert "layer1.0.conv1.weight is (64, 64, 1, 1) in the weights and (64, 64, 3, 3)" in message


def test_bad_weights_leave_no_run_folder(tmp_path, capsys):
    pets = make_folder(tmp_path / "pets")
    good = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100_000])
    tensors = tmp_path / "truncated.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tensors))
    tensors.write_bytes(tensors.read_bytes()[:5000])
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    cases = {
        truncated: "is truncated or not a PyTorch checkpoint",
        tensors: "is truncated or not a safetensors file",
        other: "does not fit resnet18",
        tmp_path / "imagenett": "no such file or folder, and not a weights name",
    }
    for n, (weights, message) in enumerate(cases.items()):
        out = tmp_path / f"run{n}"
        argv = ["train", "--data", str(pets), "--weights", str(weights), "--out", str(out)]
        assert main(argv + ["--model", "resnet18", "--epochs", "1", "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("reslab: error: "), err
        assert not out.exists()


def test_predict_reads_images_as_the_weights_preprocessing_says(tmp_path):
    from reslab.engine.config import TrainConfig
    from reslab.engine.inference import Classifier

    picture = Image.new("RGB", (60, 20), (255, 0, 0))
    picture.paste((0, 255, 0), (20, 0, 40, 20))  # a green middle between red sides
    picture.save(tmp_path / "bands.png")
    net = reslab.create_model("resnet18", width=0.125, num_classes=2)
    spec = InputSpec(16, 16, 3, (0.5,) * 3, (0.25,) * 3, "imagenet", resize=20)
    payload = make_payload(
        net, config=TrainConfig().to_dict(), classes=["a", "b"], input=spec.to_dict()
    )
    image = Classifier(payload, precision="fp32", fast_path=False).read(tmp_path / "bands.png")
    assert image.shape == (3, 16, 16) and image[1].min() >= 250 and image[0].max() <= 5
