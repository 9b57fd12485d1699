"""Fashion-MNIST (Xiao et al., 2017) from the idx files Debian's `dataset-fashion-mnist`
package installs: 60,000 training and 10,000 test images of ten kinds of clothing, the
test set 1,000 per class.

The files are read with numpy (gzip, a fixed big-endian header), never unpickled, and
every header field is checked, so a truncated or foreign file is a clear error rather
than a misshapen tensor.
"""

from __future__ import annotations

import gzip
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from penjing.data.bundled import DataSplit
from penjing.errors import FormatError, MissingDependencyError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "PENJING_FASHION_MNIST"  # a folder holding the four files, searched first
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Statistics of the 60,000 training images (pixels scaled to [0, 1]), measured on the files.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 or 1 dimensions


def _folder(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ[ENV_DIR]) if os.environ.get(ENV_DIR) else DEBIAN_DIR


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """The uint8 array of one gzip'd idx file, its header checked against its length."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise FormatError(f"{path} is not a readable gzip'd idx file ({err}); reinstall "
                          "it with `apt-get install --reinstall dataset-fashion-mnist`") from err
    head = 4 + 4 * dims
    if len(raw) < head:
        raise FormatError(f"{path} holds {len(raw)} bytes, fewer than its {head}-byte idx "
                          "header; the file is truncated")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise FormatError(f"{path} starts with magic 0x{found:08x}, expected 0x{magic:08x} "
                          f"(unsigned bytes in {dims} dimension{'s' if dims > 1 else ''})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    size = int(np.prod(shape))
    if len(raw) - head != size:
        raise FormatError(f"{path} declares shape {shape} ({size:,} bytes of data) but holds "
                          f"{len(raw) - head:,}; the file is truncated or padded")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


@cache
def _arrays(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (folder / name for name in FILES[part])
    images = _read_idx(image_file, _IMAGES_MAGIC, 3)
    labels = _read_idx(label_file, _LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise FormatError(f"{image_file} holds {len(images):,} images but {label_file} "
                          f"{len(labels):,} labels; the two files are from different sets")
    if labels.size and labels.max() >= len(CLASSES):
        raise FormatError(f"{label_file} has label {int(labels.max())}; Fashion-MNIST's labels "
                          f"are 0-{len(CLASSES) - 1}")
    x = (images[:, None].astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD
    y = labels.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def fashion_mnist(root: str | os.PathLike | None = None) -> DataSplit:
    """Fashion-MNIST's own split: 60,000 train / 10,000 test 28×28 images, normalised.

    The files come from `root`, else the folder in $PENJING_FASHION_MNIST, else where
    Debian's `dataset-fashion-mnist` puts them (/usr/share/datasets/fashion-mnist).

    >>> split = pj.data.fashion_mnist()
    >>> train_loader, test_loader = pj.data.loaders(split, batch_size=128)
    """
    folder = _folder(root)
    missing = [name for names in FILES.values() for name in names
               if not (folder / name).is_file()]
    if missing:
        raise MissingDependencyError(
            f"Fashion-MNIST is not in {folder} (missing {', '.join(missing)}); install "
            "Debian's package with `apt-get install dataset-fashion-mnist`, or put the four "
            f"original *-ubyte.gz files in a folder and pass root= or set ${ENV_DIR}"
        )
    parts = {}
    for part in FILES:
        x, y = _arrays(folder.resolve(), part)
        # copies: a caller may write into the tensors; the cached arrays stay as read
        parts[part] = TensorDataset(torch.tensor(x), torch.tensor(y))
    return DataSplit("fashion-mnist", parts["train"], parts["test"], num_classes=len(CLASSES))
