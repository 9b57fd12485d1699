"""Decoding is bounded by the file and the model: one-symbol streams are filled without a
loop, Python-level decode work is charged to a budget before it is done, and penjing.load
compares a .pjz's tensors with the model before decoding any of them."""

from __future__ import annotations

import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import penjing as pj
from penjing.codec import container, encoding, entropy, enumerative, rans
from penjing.codec.bitpack import Work
from penjing.errors import FormatError


def pjz(path, tensors: list[tuple[str, tuple[int, ...], int, bytes]]):
    """A .pjz of dense tensors: (name, shape, codebook size, code stream) each."""
    data, entries = [], []
    for name, shape, book, codes in tensors:
        cb = np.linspace(0.5, 1.0, book, dtype=np.float32).tobytes()
        data += [cb, codes]
        entries.append({"name": name, "dtype": "float32", "shape": list(shape),
                        "encoding": "dense", "codebook": book,
                        "nonzero": int(np.prod(shape)),
                        "sections": [["codebook", len(cb), zlib.crc32(cb)],
                                     ["codes", len(codes), zlib.crc32(codes)]]})
    manifest = zlib.compress(json.dumps({"format": "pjz", "data_bytes": sum(map(len, data)),
                                         "tensors": entries}).encode())
    head = struct.pack("<4sHHQI", b"PJZ\x00", 1, 0, len(manifest), zlib.crc32(manifest))
    path.write_bytes(head + manifest + b"".join(data))
    return path


def test_a_one_symbol_stream_is_filled_without_a_loop():
    data = rans.encode(np.full(1 << 20, 3, dtype=np.uint16))
    assert len(data) < 20
    start = time.perf_counter()
    out = rans.decode(data)
    assert time.perf_counter() - start < 0.2
    assert out.dtype == np.uint16 and out.size == 1 << 20 and np.all(out == 3)
    damaged = bytearray(data)
    damaged[-1] ^= 1  # a final state that moved
    with pytest.raises(ValueError, match="one symbol has a payload or moved states"):
        rans.decode(bytes(damaged))


def test_enumerative_work_is_charged_before_it_is_done():
    symbols = np.random.default_rng(0).integers(0, 4, 1000).astype(np.uint16)
    data = enumerative.encode(symbols)
    width = len(data) - 1 - 2 - 1  # tag, varint n (2 bytes), varint S
    units = 1000 * (width // 8)
    with pytest.raises(ValueError, match=f"an enumerative stream of 1,000 symbols in "
                                         f"{width:,} bytes brings it to {units:,} units, the "
                                         f"budget is {units - 1:,}"):
        enumerative.decode(data, work=Work(units - 1, "test"))
    assert np.array_equal(enumerative.decode(data, work=Work(units, "test")), symbols)


def test_what_save_writes_enumeratively_fits_its_share_of_the_budget():
    rng = np.random.default_rng(3)
    n = enumerative.ENCODE_MAX_SYMBOLS
    for alphabet in (2, 8, enumerative.MAX_ALPHABET):
        data = enumerative.encode(rng.integers(0, alphabet, n).astype(np.uint16))
        work = Work(container.WORK_PER_BYTE * len(data), "its bytes")
        enumerative.decode(data, work=work)  # no error: within what its bytes allow


def test_save_codes_no_long_stream_enumeratively():
    symbols = np.random.default_rng(1).integers(0, 3, enumerative.ENCODE_MAX_SYMBOLS + 1)
    assert entropy.coder(entropy.encode(symbols)) != "enumerative"
    short = symbols[: enumerative.ENCODE_MAX_SYMBOLS].astype(np.uint16)
    assert entropy.coder(entropy.encode(short, coders=("enumerative",))) == "enumerative"


def test_a_file_of_many_long_enumerative_streams_is_refused_fast(tmp_path):
    stream = enumerative.encode(
        np.random.default_rng(2).integers(0, 2, 8192).astype(np.uint16))
    path = pjz(tmp_path / "enum.pjz", [(f"t{i}", (8192,), 2, stream) for i in range(200)])
    start = time.perf_counter()
    with pytest.raises(FormatError, match="more work than the file's budget allows"):
        pj.codec.load(path)
    assert time.perf_counter() - start < 4  # the 200 streams would take ~20 s


def test_pj_load_compares_shapes_before_decoding(tmp_path, monkeypatch):
    one = rans.encode(np.ones(1 << 20, dtype=np.uint16))
    path = pjz(tmp_path / "claims.pjz", [(f"t{i}", (1 << 20,), 1, one) for i in range(64)])
    assert path.stat().st_size < 1500  # stands for 256 MiB of float32

    def never(*args, **kwargs):
        raise AssertionError("decoded a tensor the model has no room for")

    monkeypatch.setattr(encoding, "decode_tensor", never)
    monkeypatch.setattr(container, "decode_tensor", never)
    with pytest.raises(FormatError, match=r"do not fit Linear: tensors 2 missing \(weight, "
                                          r"bias\); 64 unexpected"):
        pj.load(path, lambda: nn.Linear(4, 2))
    # a file that fits decodes as before
    monkeypatch.undo()
    model = nn.Linear(4, 2)
    pj.codec.save(model, tmp_path / "ok.pjz")
    assert torch.equal(pj.load(tmp_path / "ok.pjz", lambda: nn.Linear(4, 2)).weight,
                       model.weight)


def test_the_budget_grows_with_the_file():
    work = container.work_budget(1000)
    assert work.limit == container.WORK_FIXED + container.WORK_PER_BYTE * 1000
    assert "32 per byte of its 1,000" in work.why


def test_thousands_of_tiny_coded_tensors_are_refused_before_any_is_decoded(tmp_path,
                                                                           monkeypatch):
    stream = rans.encode(np.array([1, 0, 1, 1], dtype=np.uint16))
    path = pjz(tmp_path / "tiny.pjz", [(f"t{i}", (4,), 1, stream) for i in range(1000)])

    def never(*args, **kwargs):
        raise AssertionError("decoded before the budget was checked")

    monkeypatch.setattr(container, "decode_tensor", never)
    start = time.perf_counter()
    with pytest.raises(FormatError, match=r"tensor 't\d+' brings it to [\d,]+ units, the "
                                          r"budget is [\d,]+: 4,194,304 \+ 32 per byte"):
        pj.codec.load(path)
    assert time.perf_counter() - start < 2
    # a few hundred are within the budget, and decode
    monkeypatch.undo()
    few = pjz(tmp_path / "few.pjz", [(f"t{i}", (4,), 1, stream) for i in range(100)])
    assert torch.equal(pj.codec.load(few)["t7"], torch.tensor([0.5, 0.0, 0.5, 0.5]))
