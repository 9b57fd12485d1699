"""The .pjz loader checks every count and shape against the file's bytes and a memory
budget before it allocates: hostile files with valid checksums fail fast as FormatError."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import penjing.codec as codec
from penjing.codec import huffman
from penjing.codec.bitpack import varint
from penjing.errors import FormatError


def _parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data, 8)
    return json.loads(zlib.decompress(data[20 : 20 + length])), data[20 + length :]


def _write(path: Path, manifest: dict | str, sections: bytes) -> Path:
    """A .pjz with this manifest and data, every checksum recomputed."""
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    blob = zlib.compress(text.encode())
    header = struct.pack("<4sHHQI", b"PJZ\x00", 1, 0, len(blob), zlib.crc32(blob))
    path.write_bytes(header + blob + sections)
    return path


@pytest.fixture
def zeros(tmp_path: Path) -> tuple[dict, bytes]:
    path = tmp_path / "zeros.pjz"
    # Huffman only: rANS would store all zeros densely in no payload bits at all.
    codec.save({"w": torch.zeros(100, 100)}, path, coders=("huffman",))
    manifest, data = _parts(path)
    assert manifest["tensors"][0]["encoding"] == "sparse"
    return manifest, data


def test_a_gigabyte_claim_beyond_the_budget_is_refused_before_allocating(zeros, tmp_path):
    manifest, data = zeros
    manifest["tensors"][0]["shape"] = [2**14, 2**14]  # 1 GiB of float32 zeros
    path = _write(tmp_path / "big.pjz", manifest, data)
    start = time.perf_counter()
    with pytest.raises(FormatError, match="more than the budget of 536,870,912 bytes"):
        codec.load(path, max_memory=2**29)
    assert time.perf_counter() - start < 0.5
    # the same file within a budget that holds it loads, and its zeros cost no work
    start = time.perf_counter()
    state = codec.load(path, max_memory=2**31)
    assert state["w"].shape == (2**14, 2**14)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="max_memory must be a positive number"):
        codec.load(path, max_memory=0)


def test_the_budget_counts_the_code_array_and_the_gather(tmp_path):
    # a dense tensor of n float16 elements needs 2n for the result plus 4n for its codes
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float16)[torch.randint(0, 3, (256, 256),
                                                                           generator=g)]
    path = tmp_path / "dense.pjz"
    codec.save({"w": w}, path)
    manifest, _ = _parts(path)
    assert manifest["tensors"][0]["encoding"] == "dense"
    peak = codec.container.peak_memory(manifest, path.stat().st_size)
    assert peak >= path.stat().st_size + 6 * w.numel()
    with pytest.raises(FormatError, match="memory"):
        codec.load(path, max_memory=path.stat().st_size + 2 * w.numel())
    assert torch.equal(codec.load(path, max_memory=peak)["w"], w)


def test_deeply_nested_json_is_a_format_error(zeros, tmp_path):
    manifest, data = zeros
    text = json.dumps(manifest).replace('"shape": [100, 100]', '"shape": ' + "[" * 100000
                                        + "]" * 100000)
    with pytest.raises(FormatError, match="nests 100003 levels deep, more than 16"):
        codec.load(_write(tmp_path / "deep.pjz", text, data))


@pytest.mark.parametrize("loader", [codec.load, codec.inspect])
def test_huge_integers_are_refused_before_any_arithmetic(zeros, tmp_path, loader):
    manifest, data = zeros
    text = json.dumps(manifest).replace('"shape": [100, 100]', '"shape": [1' + "0" * 5000 + "]")
    start = time.perf_counter()
    with pytest.raises(FormatError, match="integer of 5001 digits"):
        loader(_write(tmp_path / "int.pjz", text, data))
    manifest["tensors"][0]["shape"] = [2**62, 2**62, 2**62]
    with pytest.raises(FormatError, match="more than 281,474,976,710,656 elements"):
        loader(_write(tmp_path / "prod.pjz", manifest, data))
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("coder", ["huffman", "rans"])
def test_a_code_count_that_disagrees_with_the_shape_is_refused(tmp_path, coder):
    w = torch.tensor([0.5, -0.25, 1.0])[torch.randint(0, 3, (64, 64))]
    path = tmp_path / "dense.pjz"
    codec.save({"w": w}, path, coders=(coder,))
    manifest, data = _parts(path)
    assert manifest["tensors"][0]["encoding"] == "dense"
    manifest["tensors"][0]["shape"] = [64 * 64 + 1]
    with pytest.raises(FormatError, match="4096 codes for 4097 elements"):
        codec.load(_write(tmp_path / "many.pjz", manifest, data))
    # Fewer elements than the stream holds: the rANS decoder refuses before allocating.
    manifest["tensors"][0]["shape"] = [64 * 64 - 1]
    manifest["tensors"][0]["nonzero"] = 64 * 64 - 1
    with pytest.raises(FormatError, match="4096|4095"):
        codec.load(_write(tmp_path / "few.pjz", manifest, data))


def test_sparse_counts_must_agree(zeros, tmp_path):
    manifest, data = zeros
    manifest["tensors"][0]["entries"] += 5
    with pytest.raises(FormatError, match="entries are not 0 non-zeros"):
        codec.load(_write(tmp_path / "e.pjz", manifest, data))


def test_a_chunk_as_long_as_the_stream_is_refused_not_decoded_slowly():
    x = np.random.default_rng(0).integers(0, 16, 60_000).astype(np.uint16)
    good = huffman.encode(x)
    assert np.array_equal(huffman.decode(good), x)
    # the same payload re-headed as one chunk of 60,000 symbols and no sync points
    head = bytes(good[:4]) + varint(x.size) + varint(x.size)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="chunk 60000, at most 4096"):
        huffman.decode(head + bytes(good[len(head) :]))
    assert time.perf_counter() - start < 0.1
    with pytest.raises(ValueError, match="chunk must be an int in 1..4096"):
        huffman.encode(x, chunk=4097)


def test_a_symbol_count_beyond_the_payload_bits_is_refused():
    stream = bytes([1, 1, 0, 1]) + varint(10**12) + varint(1) + varint(10**12)
    with pytest.raises(ValueError, match="only 0 bits follow its header"):
        huffman.decode(stream)


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a .pjz file"):
        codec.load(tmp_path)


@pytest.mark.parametrize("dtype", ["qint8", "quint4x2", "bits8", "load", "Tensor"])
def test_dtypes_save_never_writes_are_refused(zeros, tmp_path, dtype):
    manifest, data = zeros
    manifest["tensors"][0].update(dtype=dtype, encoding="raw", shape=[0],
                                  sections=[["raw", 0, 0]])
    manifest["data_bytes"] = 0
    with pytest.raises(FormatError, match=f"unknown dtype '{dtype}'"):
        codec.load(_write(tmp_path / "q.pjz", manifest, b""))
