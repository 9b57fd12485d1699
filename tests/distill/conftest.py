"""Shared pieces of the distillation tests: one thread, small subsets, one trained teacher."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import penjing as pj


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: on a busy 2-core machine one thread is several times faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_loader(mnist, n: int = 1000, batch_size: int = 50, seed: int = 0) -> DataLoader:
    # every 4th image: the file is ordered by class, so a prefix would miss classes
    return DataLoader(Subset(mnist.train, range(0, 4 * n, 4)), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_train(mnist) -> DataLoader:
    """1,000 training images spread over all classes, shuffled by a fixed seed."""
    return train_loader(mnist)


@pytest.fixture(scope="module")
def test_loader(mnist) -> DataLoader:
    return DataLoader(mnist.test, batch_size=500)


@pytest.fixture(scope="module")
def teacher(mnist, small_train) -> torch.nn.Module:
    """A LeNet-5 trained for 3 epochs on 1,000 images (about 92 % test accuracy)."""
    torch.manual_seed(0)
    model = pj.models.create("lenet5")
    pj.train.fit(model, small_train, epochs=3, progress=False)
    return model
