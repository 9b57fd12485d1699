"""Canonical Huffman: exact round trips, prefix-free canonical codes, near-entropy length."""

from __future__ import annotations

import math

import numpy as np
import pytest

from penjing.codec import huffman


def _skewed(rng: np.random.Generator, alphabet: int, n: int) -> np.ndarray:
    p = 0.7 ** np.arange(alphabet, dtype=np.float64)
    return rng.choice(alphabet, size=n, p=p / p.sum()).astype(np.uint16)


def _uniform(rng: np.random.Generator, alphabet: int, n: int) -> np.ndarray:
    return rng.integers(0, alphabet, size=n).astype(np.uint16)


# decode() pointer-jumps short streams and runs chunks in lockstep for long ones; force each.
PATHS = {"jumping": 1 << 62, "lockstep": 0}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alphabet", [2, 3, 32, 300, 5000])
@pytest.mark.parametrize("make", [_skewed, _uniform])
def test_encode_decode_is_exact(alphabet: int, make, path: str, monkeypatch) -> None:
    monkeypatch.setattr(huffman, "_JUMP_WORK", PATHS[path])
    rng = np.random.default_rng(alphabet)
    # 2.5 chunks: full chunks plus a short last one.
    x = make(rng, alphabet, 2 * huffman.DEFAULT_CHUNK + 517)
    assert np.array_equal(huffman.decode(huffman.encode(x)), x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", [1, 7, 1024, huffman.MAX_CHUNK])
def test_any_chunk_size_round_trips(chunk: int, path: str, monkeypatch) -> None:
    monkeypatch.setattr(huffman, "_JUMP_WORK", PATHS[path])
    x = _skewed(np.random.default_rng(1), 20, 3001)
    assert np.array_equal(huffman.decode(huffman.encode(x, chunk=chunk)), x)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros(0, dtype=np.uint16),
        np.array([7], dtype=np.uint16),
        np.full(5000, 65535, dtype=np.uint16),
        np.array([0, 1], dtype=np.uint16),
    ],
    ids=["empty", "one-symbol", "all-equal", "two-symbols"],
)
@pytest.mark.parametrize("path", PATHS)
def test_edge_cases_round_trip(x: np.ndarray, path: str, monkeypatch) -> None:
    monkeypatch.setattr(huffman, "_JUMP_WORK", PATHS[path])
    assert np.array_equal(huffman.decode(huffman.encode(x)), x)


def test_lone_symbol_costs_one_bit() -> None:
    assert huffman.coded_bits(np.full(1000, 3, dtype=np.uint16)) == 1000
    assert huffman.code_lengths(np.array([0, 0, 9]))[2] == 1


def test_full_16_bit_alphabet_round_trips() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([np.arange(1 << 16), rng.integers(0, 1 << 16, 20000)]).astype(np.uint16)
    rng.shuffle(x)
    assert np.array_equal(huffman.decode(huffman.encode(x)), x)


@pytest.mark.parametrize("path", PATHS)
def test_codes_longer_than_the_lookup_table_round_trip(path: str, monkeypatch) -> None:
    monkeypatch.setattr(huffman, "_JUMP_WORK", PATHS[path])
    # Counts 2^18, 2^17, ..., 1 need codes of up to 18 bits, past the decoder's 16-bit
    # first-level table, so the long codes go through its fallback search.
    counts = 2 ** np.arange(18, -1, -1)
    x = np.repeat(np.arange(counts.size) * 3000, counts).astype(np.uint16)
    np.random.default_rng(3).shuffle(x)
    data = huffman.encode(x)
    assert data[1] == 18  # header byte 1: the longest code in use
    assert np.array_equal(huffman.decode(data), x)


def test_known_optimal_lengths() -> None:
    assert huffman.code_lengths(np.array([1, 1, 2, 4, 8])).tolist() == [4, 4, 3, 2, 1]
    assert huffman.code_lengths(np.array([5, 0, 5])).tolist() == [1, 0, 1]


@pytest.mark.parametrize("max_len", [8, 12, 24])
def test_lengths_are_limited_and_satisfy_kraft(max_len: int) -> None:
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, dtype=np.int64)  # unlimited Huffman would need 39-bit codes
    lengths = huffman.code_lengths(counts, max_len=max_len).astype(np.int64)
    assert lengths.max() <= max_len
    assert (lengths > 0).all()
    assert np.sum(2.0**-lengths) <= 1.0
    x = np.repeat(np.arange(40), np.minimum(counts, 50)).astype(np.uint16)
    assert np.array_equal(huffman.decode(huffman.encode(x, max_len=max_len)), x)


def test_too_many_symbols_for_max_len_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_len"):
        huffman.code_lengths(np.ones(300, dtype=np.int64), max_len=8)


def test_canonical_code_is_prefix_free_and_canonical() -> None:
    counts = np.random.default_rng(4).integers(0, 1000, size=200)
    lengths = huffman.code_lengths(counts).astype(np.int64)
    codes = huffman.canonical_codes(lengths).astype(np.int64)
    present = np.flatnonzero(lengths)
    top = lengths.max()
    # Left-aligned, each code owns an interval of [0, 2^top); prefix-free = disjoint.
    lo = codes[present] << (top - lengths[present])
    hi = (codes[present] + 1) << (top - lengths[present])
    order = np.argsort(lo)
    assert (hi[order][:-1] <= lo[order][1:]).all()
    assert (codes[present] < (1 << lengths[present])).all()
    # Canonical: sorted by (length, symbol), codes increase, so the lengths define them.
    canon = present[np.lexsort((present, lengths[present]))]
    assert (np.diff(lo[np.searchsorted(present, canon)]) > 0).all()


@pytest.mark.parametrize("make", [_skewed, _uniform])
def test_coded_length_is_within_one_bit_of_entropy(make) -> None:
    rng = np.random.default_rng(5)
    x = make(rng, 32, 50_000)
    h = huffman.entropy_bits(x)
    payload = huffman.coded_bits(x)
    assert x.size * h <= payload <= x.size * (h + 1)  # Shannon floor; Huffman bound
    total = 8 * len(huffman.encode(x))
    sync_bits = (math.ceil(x.size / huffman.DEFAULT_CHUNK) - 1) * payload.bit_length()
    header_and_table_bits = 8 * 16 + 32 * 5
    assert payload <= total <= payload + sync_bits + header_and_table_bits + 8


def test_skewed_stream_beats_fixed_width() -> None:
    x = _skewed(np.random.default_rng(6), 32, 50_000)
    assert huffman.fixed_width_bits(32) == 5
    assert 8 * len(huffman.encode(x)) < 0.8 * 5 * x.size


def test_measures() -> None:
    assert huffman.entropy_bits(np.array([0, 1, 2, 3] * 10, dtype=np.uint8)) == pytest.approx(2.0)
    assert huffman.entropy_bits(np.zeros(10, dtype=np.uint8)) == 0.0
    assert huffman.entropy_bits(np.zeros(0, dtype=np.uint8)) == 0.0
    assert [huffman.fixed_width_bits(k) for k in (1, 2, 3, 32, 33, 65536)] == [0, 1, 2, 5, 6, 16]
    assert huffman.coded_bits(np.array([0, 0, 1, 2], dtype=np.uint16)) == 6


def test_accepts_wider_integer_input() -> None:
    x = np.array([5, 70, 5, 65535], dtype=np.uint32)
    assert np.array_equal(huffman.decode(huffman.encode(x)), x)
    assert np.array_equal(huffman.decode(huffman.encode(x.astype(np.int64))), x)


@pytest.mark.parametrize(
    ("x", "error"),
    [
        (np.array([-1, 2]), ValueError),
        (np.array([65536]), ValueError),
        (np.array([0.5, 1.0]), TypeError),
    ],
)
def test_bad_symbols_are_rejected(x: np.ndarray, error: type) -> None:
    with pytest.raises(error, match="symbols"):
        huffman.encode(x)


@pytest.mark.parametrize("path", PATHS)
def test_corrupt_streams_raise_value_error(path: str, monkeypatch) -> None:
    monkeypatch.setattr(huffman, "_JUMP_WORK", PATHS[path])
    data = huffman.encode(_skewed(np.random.default_rng(7), 32, 5000))
    for cut in (0, 3, 8, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            huffman.decode(data[:cut])
    with pytest.raises(ValueError, match="version"):
        huffman.decode(bytes([99]) + data[1:])
    with pytest.raises(ValueError, match="unexpected bytes"):
        huffman.decode(data + b"\x00")


@pytest.mark.parametrize("path", PATHS)
def test_payload_that_misses_the_symbol_count_is_rejected(path: str, monkeypatch) -> None:
    monkeypatch.setattr(huffman, "_JUMP_WORK", PATHS[path])
    # One symbol coded '0'; a payload bit of 1 is no code at all.
    data = bytearray(huffman.encode(np.zeros(16, dtype=np.uint16)))
    assert data[-2:] == b"\x00\x00"
    data[-1] = 0x01
    with pytest.raises(ValueError, match="corrupt"):
        huffman.decode(bytes(data))
