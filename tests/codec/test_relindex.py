"""Relative-index format: exact round trips, the paper's padding rule, gap-width limits."""

from __future__ import annotations

import numpy as np
import pytest

from penjing.codec import relindex


def _reference(codes: np.ndarray, index_bits: int) -> tuple[list[int], list[int]]:
    """The paper's rule one element at a time: a zero that would overflow the gap becomes a
    padding entry; padding after the last non-zero is dropped (the length is stored)."""
    top = (1 << index_bits) - 1
    gaps, values, run, kept = [], [], 0, 0
    for x in codes.tolist():
        if x:
            gaps.append(run)
            values.append(x)
            run, kept = 0, len(gaps)
        elif run == top:
            gaps.append(top)
            values.append(0)
            run = 0
        else:
            run += 1
    return gaps[:kept], values[:kept]


def _sparse(rng: np.random.Generator, n: int, density: float, long_run: int) -> np.ndarray:
    codes = rng.integers(1, 32, size=n) * (rng.random(n) < density)
    start = int(rng.integers(0, max(1, n - long_run)))
    codes[start : start + long_run] = 0  # one run much longer than any gap can hold
    return codes.astype(np.uint16)


@pytest.mark.parametrize("index_bits", range(1, 17))
def test_round_trip_matches_the_paper_rule(index_bits: int) -> None:
    rng = np.random.default_rng(index_bits)
    top = (1 << index_bits) - 1
    codes = _sparse(rng, n=3 * top + 3000, density=0.05, long_run=2 * top + 5)
    gaps, values = relindex.encode(codes, index_bits)
    assert int(gaps.max()) <= top
    assert np.array_equal(relindex.decode(gaps, values, codes.size, index_bits), codes)
    ref_gaps, ref_values = _reference(codes, index_bits)
    assert gaps.tolist() == ref_gaps
    assert values.tolist() == ref_values


@pytest.mark.parametrize("index_bits", [1, 2, 3, 5, 8, 16])
def test_padding_count_is_the_closed_form(index_bits: int) -> None:
    codes = _sparse(np.random.default_rng(0), n=5000, density=0.02, long_run=4000)
    gaps, values = relindex.encode(codes, index_bits)
    where = np.flatnonzero(codes)
    runs = np.diff(where, prepend=-1) - 1
    expected = sum(r // (1 << index_bits) for r in runs.tolist())
    assert relindex.padding_count(codes, index_bits) == expected
    assert int(np.count_nonzero(values == 0)) == expected
    assert gaps.size == where.size + expected


def test_paper_example() -> None:
    codes = np.array([0, 0, 5, 0, 0, 0, 0, 7])
    gaps, values = relindex.encode(codes, index_bits=2)
    assert gaps.tolist() == [2, 3, 0]
    assert values.tolist() == [5, 0, 7]


@pytest.mark.parametrize("index_bits", [1, 4, 16])
def test_edge_cases_round_trip(index_bits: int) -> None:
    cases = {
        "empty": np.zeros(0, dtype=np.uint16),
        "all-zero": np.zeros(70_000, dtype=np.uint16),
        "all-nonzero": np.arange(1, 501, dtype=np.uint16),
        "last-only": np.r_[np.zeros(999), 3].astype(np.uint16),
        "first-only": np.r_[4, np.zeros(999)].astype(np.uint16),
    }
    for name, codes in cases.items():
        gaps, values = relindex.encode(codes, index_bits)
        back = relindex.decode(gaps, values, codes.size, index_bits)
        assert np.array_equal(back, codes), name
    gaps, _ = relindex.encode(cases["all-zero"], index_bits)
    assert gaps.size == 0  # trailing zeros need no entry
    gaps, _ = relindex.encode(cases["all-nonzero"], index_bits)
    assert not gaps.any()
    gaps, _ = relindex.encode(cases["last-only"], index_bits)
    assert gaps.size == 1 + (999 >> index_bits)


def test_multidimensional_codes_flatten_row_major() -> None:
    codes = np.array([[0, 2], [3, 0]], dtype=np.uint8)
    gaps, values = relindex.encode(codes, 4)
    assert gaps.tolist() == [1, 0] and values.tolist() == [2, 3]


@pytest.mark.parametrize(
    ("bits", "error"), [(0, ValueError), (17, ValueError), (True, TypeError), (2.5, TypeError)]
)
def test_bad_index_bits_are_rejected(bits, error: type) -> None:
    with pytest.raises(error, match="index_bits"):
        relindex.encode(np.array([0, 1]), bits)


def test_inconsistent_streams_are_rejected() -> None:
    gaps, values = relindex.encode(np.array([0, 0, 1, 0, 2]), 3)
    with pytest.raises(ValueError, match="past the length"):
        relindex.decode(gaps, values, 4)
    with pytest.raises(ValueError, match="pair up"):
        relindex.decode(gaps, values[:-1], 5)
    with pytest.raises(ValueError, match="does not fit"):
        relindex.decode(np.array([9]), np.array([1]), 20, index_bits=3)
    with pytest.raises(ValueError, match="non-negative"):
        relindex.decode(np.array([-1]), np.array([1]), 20)
