"""Binary and ternary weights: one scale per row plus 1 or 2 bits per element.

A tensor whose every row (dim 0, an output channel) holds only ±a (binary: BWN, XNOR-Net,
BinaryConnect with a = 1) or only 0 and ±a (ternary: TWN) is stored as the `rows` scales
a ≥ 0 (bit patterns, like a codebook) and one packed field per element: 1 bit (0 = +a,
1 = −a) or 2 bits (0 = zero, 1 = +a, 2 = −a). −a is +a with its sign bit set, so the
tensor comes back bit-exact (zeros as +0.0, as every coded encoding stores them).
A per-tensor codebook would need 2·rows entries and log2(2·rows) bits per code here.
"""

from __future__ import annotations

import numpy as np
import torch

from penjing.codec.bitpack import pack_uints, packed_size, unpack_uints

SECTIONS = ("scales", "levels")
LEVELS = {2: 1, 3: 2}  # number of levels → bits per element


def rows_of(shape: tuple[int, ...] | list[int]) -> int:
    """Rows a tensor of `shape` has: dim 0 (one for a 1-D or 0-D tensor)."""
    return int(shape[0]) if len(shape) > 1 else 1


def split(t: torch.Tensor, patterns: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(levels, per-row scale patterns, per-element codes) when `t` is binary or ternary
    per row; None otherwise. `patterns` are the elements' float bit patterns (signed ints)."""
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        return None
    sign_bit = np.array(np.iinfo(patterns.dtype).min, dtype=patterns.dtype)
    rows = patterns.reshape(rows_of(t.shape), -1)
    magnitude = rows & ~sign_bit  # |x| as a bit pattern: sign bit cleared
    scale = magnitude.max(axis=1)
    zero = magnitude == 0
    if not np.all(zero | (magnitude == scale[:, None])):
        return None
    negative = (rows & sign_bit) != 0
    if not zero.any():
        return 2, scale, negative.astype(np.uint8).ravel()
    codes = np.where(zero, 0, np.where(negative, 2, 1)).astype(np.uint8)
    return 3, scale, codes.ravel()


def encode(levels: int, scale: np.ndarray, codes: np.ndarray, little: str
           ) -> tuple[list[tuple[str, bytes]], dict]:
    """Sections and manifest fields of a split tensor."""
    sections = [("scales", scale.astype(little).tobytes()),
                ("levels", pack_uints(codes, LEVELS[levels]))]
    return sections, {"encoding": "packed", "levels": levels}


def decode(entry: dict, sections: dict, shape: tuple[int, ...], little: str) -> np.ndarray:
    """The bit patterns of a packed tensor (flat), ready to view as its dtype."""
    levels, numel = entry["levels"], int(np.prod(shape, dtype=np.int64))
    if levels not in LEVELS:
        raise ValueError(f"packed levels must be 2 or 3, got {levels!r}")
    n_rows, width = rows_of(shape), LEVELS[levels]
    item = np.dtype(little).itemsize
    if len(sections["scales"]) != n_rows * item:
        raise ValueError(f"scales section has {len(sections['scales'])} bytes for {n_rows} "
                         f"rows of {item} bytes")
    if len(sections["levels"]) != packed_size(numel, width):
        raise ValueError(f"levels section has {len(sections['levels'])} bytes, {numel} "
                         f"elements of {width} bits need {packed_size(numel, width)}")
    native = np.dtype(little).newbyteorder("=")
    scale = np.frombuffer(sections["scales"], dtype=little).astype(native)
    codes = unpack_uints(sections["levels"], numel, width).astype(np.uint8)
    if levels == 3 and codes.size and int(codes.max()) > 2:
        raise ValueError(f"ternary code {int(codes.max())} is not 0, 1 or 2")
    sign_bit = np.array(np.iinfo(native).min, dtype=native)
    per_row = numel // n_rows if n_rows else 0
    full = np.repeat(scale, per_row)
    if levels == 2:
        return np.where(codes == 1, full | sign_bit, full)
    return np.where(codes == 0, np.zeros_like(full), np.where(codes == 2, full | sign_bit, full))


def expected_sizes(entry: dict, shape: list[int], itemsize: int) -> dict[str, int]:
    """Section lengths a packed entry must have (for the manifest checks)."""
    levels = entry.get("levels")
    if levels not in LEVELS:
        raise ValueError(f"packed levels must be 2 or 3, got {str(levels)[:20]!r}")
    numel = int(np.prod(shape, dtype=np.int64))
    return {"scales": rows_of(shape) * itemsize,
            "levels": packed_size(numel, LEVELS[levels])}
