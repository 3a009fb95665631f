import pytest
import torch

from reslab.data import fashion_mnist
from reslab.data.sources import fashion_mnist_source
from reslab.errors import ReslabError


def test_system_dir_comes_first(fake_fmnist, monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", fake_fmnist)
    assert fashion_mnist.locate(tmp_path / "elsewhere") == fake_fmnist
    split = fashion_mnist.load("train", check_hash=False)
    assert split.images.shape == (40, 28, 28) and split.source == fake_fmnist
    described = fashion_mnist_source(str(tmp_path / "elsewhere"), verify=False).description
    assert described.startswith(f"Fashion-MNIST from {fake_fmnist} ")
    assert f"--data-dir {tmp_path / 'elsewhere'} not used" in described
    assert "not used" not in fashion_mnist_source(str(fake_fmnist), verify=False).description


def test_data_dir_when_no_system_files(fake_fmnist):
    source = fashion_mnist_source(str(fake_fmnist), verify=False)
    assert source.train_size == 40 and source.test_size == 20
    assert source.train_images.shape == (40, 1, 28, 28) and str(fake_fmnist) in source.description


def test_verify_refuses_files_that_are_not_the_release(fake_fmnist):
    with pytest.raises(ReslabError, match="bytes decompressed"):
        fashion_mnist_source(str(fake_fmnist), verify=True)


def test_download_through_torchvision(fake_fmnist, tmp_path, monkeypatch):
    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raw = tmp_path / "dl" / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for path in fake_fmnist.iterdir():
                (raw / path.name).write_bytes(path.read_bytes())

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    folder = fashion_mnist.locate(tmp_path / "dl")
    assert folder == tmp_path / "dl" and [c[1] for c in calls] == [True, False]
    assert len(fashion_mnist.load("test", tmp_path / "dl", check_hash=False)) == 20


def test_missing_everywhere_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "none")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(ReslabError) as info:
        fashion_mnist.load("train", tmp_path / "empty")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert "download failed (OSError: network unreachable)" in message and "\n" not in message


def test_train_batches_follow_the_generator(fake_fmnist):
    source = fashion_mnist_source(str(fake_fmnist), verify=False)
    first = [labels for _, labels in source.train_batches(16, torch.Generator().manual_seed(1))]
    again = [labels for _, labels in source.train_batches(16, torch.Generator().manual_seed(1))]
    assert len(first) == 2  # 40 images: two full batches, the short one dropped
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
