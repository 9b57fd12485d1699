"""Binary and ternary rows stored as a scale per row plus 1 or 2 bits per element."""

from __future__ import annotations

import math

import pytest
import torch

import penjing as pj


def _binary(rows: int, cols: int) -> torch.Tensor:
    alpha = torch.rand(rows, 1) + 0.1
    return alpha * torch.where(torch.rand(rows, cols) < 0.5, -1.0, 1.0)


def _ternary(rows: int, cols: int) -> torch.Tensor:
    alpha = torch.rand(rows, 1) + 0.1
    return alpha * torch.randint(-1, 2, (rows, cols)).float()


def _layer(path, name):
    return next(row for row in pj.codec.inspect(path).layers if row.name == name)


@pytest.mark.parametrize(("make", "levels", "bits"), [(_binary, 2, 1), (_ternary, 3, 2)])
def test_rows_round_trip_bit_exact_at_the_packed_size(tmp_path, make, levels, bits):
    w = make(50, 20 * 25).reshape(50, 20, 5, 5)
    w[3] = 0.0 if levels == 3 else w[3]  # a ternary row of zeros has scale 0
    path = tmp_path / "m.pjz"
    pj.codec.save({"conv.weight": w}, path)
    row = _layer(path, "conv.weight")
    assert row.encoding == "packed" and row.weight_bits == bits
    assert row.codebook_bytes == 50 * 4  # the scales
    assert row.weight_bytes == math.ceil(w.numel() * bits / 8)
    assert row.total_bytes == row.codebook_bytes + row.weight_bytes
    back = pj.codec.load(path)["conv.weight"]
    assert torch.equal(back.view(torch.int32), (w + 0.0).view(torch.int32))  # +0.0 zeros


def test_binary_with_one_scale_binaryconnect_and_a_bias_vector(tmp_path):
    w = torch.where(torch.rand(300, 784) < 0.5, -1.0, 1.0)
    b = torch.full((300,), -0.25)  # a 1-D tensor is one row
    path = tmp_path / "m.pjz"
    pj.codec.save({"fc.weight": w, "fc.bias": b}, path)
    row = _layer(path, "fc.weight")  # one value ±1: a 2-entry codebook is as small
    assert row.total_bytes <= 300 * 4 + 300 * 784 // 8  # 1/32 of FP32 plus the scales
    state = pj.codec.load(path)
    assert torch.equal(state["fc.weight"], w) and torch.equal(state["fc.bias"], b)


def test_rows_with_two_magnitudes_are_not_packed(tmp_path):
    w = _binary(4, 64)
    w[0, 0] *= 2
    path = tmp_path / "m.pjz"
    pj.codec.save({"w": w}, path)
    assert _layer(path, "w").encoding != "packed"
    assert torch.equal(pj.codec.load(path)["w"], w)


def test_a_corrupt_packed_entry_is_a_format_error(tmp_path):
    w = _ternary(8, 64)
    path = tmp_path / "m.pjz"
    pj.codec.save({"w": w}, path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the levels section
    bad = tmp_path / "bad.pjz"
    bad.write_bytes(bytes(data))
    with pytest.raises(pj.errors.FormatError):
        pj.codec.load(bad)
