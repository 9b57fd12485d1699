"""Fashion-MNIST's idx reader, on small idx files written here (CI may lack the package)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import penjing as pj
from penjing.data.fashion import ENV_DIR, FASHION_MEAN, FASHION_STD, FILES
from penjing.errors import FormatError, MissingDependencyError


def _idx(path, array: np.ndarray, magic: int | None = None) -> None:
    magic = magic if magic is not None else 0x800 + array.ndim
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


def _write_set(folder, train: int = 20, test: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, n in (("train", train), ("test", test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _idx(folder / FILES[part][0], images)
        _idx(folder / FILES[part][1], labels)
        arrays[part] = images, labels
    return arrays


def test_reads_the_files_exactly(tmp_path):
    arrays = _write_set(tmp_path)
    split = pj.data.fashion_mnist(tmp_path)
    assert split.name == "fashion-mnist" and split.num_classes == 10
    assert split.image_shape == (1, 28, 28)
    for part, data in (("train", split.train), ("test", split.test)):
        images, labels = arrays[part]
        x, y = data.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
        want = (images[:, None].astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD
        assert torch.equal(x, torch.from_numpy(want))


def test_environment_folder_is_used_without_root(tmp_path, monkeypatch):
    _write_set(tmp_path, train=30, test=10)
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    assert len(pj.data.fashion_mnist().train) == 30
    assert len(pj.data.load("fashion-mnist").test) == 10


def test_each_call_gets_its_own_tensors(tmp_path):
    _write_set(tmp_path)
    first = pj.data.fashion_mnist(tmp_path)
    first.train.tensors[0].zero_()
    assert pj.data.fashion_mnist(tmp_path).train.tensors[0].abs().sum() > 0


def test_absent_files_name_the_package_to_install(tmp_path):
    with pytest.raises(MissingDependencyError,
                       match=r"apt-get install dataset-fashion-mnist") as err:
        pj.data.fashion_mnist(tmp_path / "nowhere")
    assert "train-images-idx3-ubyte.gz" in str(err.value)


def test_truncated_file_is_a_format_error(tmp_path):
    _write_set(tmp_path)
    path = tmp_path / FILES["test"][0]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(FormatError, match=r"declares shape \(10, 28, 28\).*truncated"):
        pj.data.fashion_mnist(tmp_path)


def test_wrong_magic_and_mismatched_counts_are_format_errors(tmp_path):
    _write_set(tmp_path)
    _idx(tmp_path / FILES["train"][1], np.zeros(20, np.uint8), magic=0x803)
    with pytest.raises(FormatError, match="magic 0x00000803, expected 0x00000801"):
        pj.data.fashion_mnist(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _write_set(other)
    _idx(other / FILES["train"][1], np.zeros(19, np.uint8))
    with pytest.raises(FormatError, match="20 images but .* 19 labels"):
        pj.data.fashion_mnist(other)


def test_not_gzip_is_a_format_error(tmp_path):
    _write_set(tmp_path)
    (tmp_path / FILES["train"][0]).write_bytes(b"plain bytes, not gzip")
    with pytest.raises(FormatError, match="not a readable gzip'd idx file"):
        pj.data.fashion_mnist(tmp_path)
