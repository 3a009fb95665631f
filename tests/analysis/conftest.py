import pytest
import torch


def random_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 28x28 images and labels, as Fashion-MNIST's loader returns them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def data():
    return random_pair
