"""Relative-index sparse format: store each kept weight as (zeros skipped, code).

Deep Compression (Han et al., ICLR 2016, Sec. 2) stores a pruned tensor, flattened in
row-major order, as the gap to the previous stored entry in `index_bits` bits plus the
weight's codebook index. A run of zeros longer than a gap can say gets padding entries:
each stands on a zero position, skips the most a gap can hold, and stores code 0.

    >>> gaps, values = encode(np.array([0, 0, 5, 0, 0, 0, 0, 7]), index_bits=2)
    >>> gaps.tolist(), values.tolist()
    ([2, 3, 0], [5, 0, 7])

Code 0 always means "zero weight", so padding decodes like any entry: it writes a zero.
"""

from __future__ import annotations

import numpy as np

MAX_INDEX_BITS = 16  # gaps are Huffman symbols, which are at most 16 bits


def check_index_bits(index_bits: int) -> int:
    """Validate a gap width: an int in 1..16 (Deep Compression uses 8 for conv, 5 for fc)."""
    if isinstance(index_bits, bool) or not isinstance(index_bits, int | np.integer):
        raise TypeError(f"index_bits must be an int in 1..16, got {type(index_bits).__name__}")
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(
            f"index_bits must be in 1..{MAX_INDEX_BITS}, got {index_bits}; "
            "Deep Compression uses 8 for conv layers and 5 for fc layers"
        )
    return int(index_bits)


def max_gap(index_bits: int) -> int:
    """Largest gap `index_bits` bits can store: 2**index_bits - 1."""
    return (1 << check_index_bits(index_bits)) - 1


def _flat_codes(codes: np.ndarray) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.size and arr.dtype.kind not in "uib":
        raise TypeError(f"codes must be an integer array, got dtype {arr.dtype}")
    return arr.ravel()


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the non-zero codes and the zero run before each of them."""
    where = np.flatnonzero(flat)
    runs = np.diff(where, prepend=-1) - 1
    return where, runs


def padding_count(codes: np.ndarray, index_bits: int) -> int:
    """Padding entries `encode` will insert: a run of r zeros needs r >> index_bits of them.

    Each padding entry covers 2**index_bits positions (the zeros it skips plus its own),
    and whatever is left, at most 2**index_bits - 1, fits the next gap.
    """
    b = check_index_bits(index_bits)
    _, runs = _runs(_flat_codes(codes))
    return int((runs >> b).sum())


def encode(codes: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Split flat codes (0 = zero weight) into parallel (gaps, values) entry streams.

    Trailing zeros get no entry: the decoder is told the total length. Gaps are uint16;
    values keep the dtype of `codes`.
    """
    b = check_index_bits(index_bits)
    flat = _flat_codes(codes)
    where, runs = _runs(flat)
    pad = runs >> b
    # Entry i's slot comes after the i entries and all the padding before it.
    slot = np.arange(where.size) + np.cumsum(pad)
    count = where.size + int(pad.sum())
    gaps = np.full(count, (1 << b) - 1, dtype=np.uint16)
    values = np.zeros(count, dtype=flat.dtype)
    gaps[slot] = runs - (pad << b)
    values[slot] = flat[where]
    return gaps, values


def positions(gaps: np.ndarray, n: int, index_bits: int | None = None) -> np.ndarray:
    """Flat position of every entry of a gap stream of a length-`n` tensor (int64);
    gaps that do not fit `index_bits` or reach past `n` are a ValueError."""
    gaps = np.asarray(gaps).ravel()
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if gaps.size and gaps.dtype.kind not in "ui":
        raise ValueError(f"gaps must be integers, got dtype {gaps.dtype}")
    steps = gaps.astype(np.int64) + 1
    if steps.size and steps.min() < 1:
        raise ValueError(f"gaps must be non-negative, got {int(steps.min()) - 1}")
    if index_bits is not None and steps.size and steps.max() - 1 > max_gap(index_bits):
        raise ValueError(
            f"gap {int(steps.max()) - 1} does not fit in index_bits={index_bits} "
            f"(at most {max_gap(index_bits)})"
        )
    where = np.cumsum(steps, out=steps)
    where -= 1
    if where.size and where[-1] >= n:
        raise ValueError(f"entries reach position {int(where[-1])}, past the length n={n}")
    return where


def decode(
    gaps: np.ndarray, values: np.ndarray, n: int, index_bits: int | None = None
) -> np.ndarray:
    """Rebuild the `n` flat codes from (gaps, values); inconsistent streams are a ValueError."""
    gaps, values = np.asarray(gaps).ravel(), np.asarray(values).ravel()
    if gaps.size != values.size:
        raise ValueError(
            f"gaps and values must pair up, got {gaps.size} gaps and {values.size} values"
        )
    where = positions(gaps, n, index_bits)
    out = np.zeros(int(n), dtype=values.dtype)
    out[where] = values
    return out
