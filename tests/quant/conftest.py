"""A LeNet-5 trained once per session on the bundled MNIST subset, for PTQ / QAT tests."""

from __future__ import annotations

import pytest
import torch

import penjing as pj


@pytest.fixture(scope="session")
def lenet5_trained(mnist):
    torch.manual_seed(0)
    train, test = pj.data.loaders(mnist, batch_size=64)
    model = pj.models.create("lenet5")
    pj.train.fit(model, train, epochs=2, progress=False)
    calib = [x for (x, _), _ in zip(train, range(4), strict=False)]  # 256 images
    return model.eval(), train, test, calib, pj.train.evaluate(model, test)
