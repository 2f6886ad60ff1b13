from __future__ import annotations

import pytest
import torch

from edgeff.data import ImageData, load_data


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist_small() -> ImageData:
    """The real MNIST subset shipped with the package (5,000 train / 1,000 test images)."""
    return load_data("builtin")


@pytest.fixture(scope="session")
def real_batch(mnist_small: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    """64 real MNIST training images and labels."""
    return next(mnist_small.train_batches(64, seed=0))
