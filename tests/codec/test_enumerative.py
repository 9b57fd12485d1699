"""Enumerative coding of short streams: exact round trips, a size within a few bytes of
the stream's entropy (the counts and the header are all it adds), and bounds on what a
damaged or hostile stream may claim."""

from __future__ import annotations

import math

import numpy as np
import pytest

from penjing.codec import entropy, enumerative, huffman, rans


def _stream(n: int, alphabet: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(alphabet, n, p=rng.dirichlet(np.ones(alphabet))).astype(np.uint16)


@pytest.mark.parametrize("n", [0, 1, 2, 9, 300, enumerative.MAX_SYMBOLS])
@pytest.mark.parametrize("alphabet", [1, 2, 5, enumerative.MAX_ALPHABET])
def test_round_trip_is_exact(n: int, alphabet: int) -> None:
    s = _stream(n, alphabet, seed=n + alphabet)
    assert np.array_equal(enumerative.decode(enumerative.encode(s)), s)


@pytest.mark.parametrize(("n", "alphabet"), [(10, 4), (100, 4), (500, 8), (4000, 8)])
def test_size_is_the_orderings_plus_the_counts(n: int, alphabet: int) -> None:
    s = _stream(n, alphabet, seed=7)
    counts = np.bincount(s, minlength=int(s.max()) + 1)
    orderings = math.factorial(n) // math.prod(math.factorial(int(c)) for c in counts)
    radices = 1
    left = n
    for c in counts[:-1]:
        radices *= left + 1
        left -= int(c)
    header = 1 + len(entropy.varint(n)) + len(entropy.varint(counts.size))
    data = enumerative.encode(s)
    assert len(data) == header + ((orderings * radices - 1).bit_length() + 7) // 8
    # and so a few bytes over the empirical entropy, below rANS's table and state
    assert 8 * len(data) <= huffman.entropy_bits(s) * n + 8 * header + 8 * alphabet * 2
    assert len(data) < len(rans.encode(s))


def test_the_first_stream_of_its_counts_is_rank_zero() -> None:
    s = np.array([0, 0, 1, 1, 2], dtype=np.uint16)  # lexicographically first
    last = np.array([2, 1, 1, 0, 0], dtype=np.uint16)
    assert len(enumerative.encode(s)) == len(enumerative.encode(last))
    value = int.from_bytes(enumerative.encode(s)[3:], "big")
    assert value == 2 + 6 * 2  # counts 2, 2 (radices 6, 4) and rank 0


def test_limits_are_value_errors() -> None:
    with pytest.raises(ValueError, match=f"at most {enumerative.MAX_SYMBOLS} symbols"):
        enumerative.encode(np.zeros(enumerative.MAX_SYMBOLS + 1, dtype=np.uint16))
    with pytest.raises(ValueError, match="symbols below"):
        enumerative.encode(np.array([enumerative.MAX_ALPHABET], dtype=np.uint16))
    data = enumerative.encode(_stream(300, 4, seed=1))
    with pytest.raises(ValueError, match="at most 299 expected"):
        enumerative.decode(data, max_symbols=299)


@pytest.mark.parametrize("seed", range(40))
def test_damaged_streams_are_value_errors_or_decode_to_the_claimed_count(seed: int) -> None:
    s = _stream(200 + seed, 6, seed=seed)
    data = bytearray(enumerative.encode(s))
    rng = np.random.default_rng(seed)
    if seed % 4 == 0:
        data = data[: rng.integers(0, len(data))]
    elif seed % 4 == 1:
        data += bytes(rng.integers(0, 256, int(rng.integers(1, 5000))).astype(np.uint8))
    else:
        data[rng.integers(0, len(data))] ^= 1 << int(rng.integers(0, 8))
    try:
        out = enumerative.decode(bytes(data))
    except ValueError:
        return
    # A flipped bit in the rank is another valid stream of the same counts: no check can
    # see it here (the container's CRC does); it must still have the claimed length.
    assert out.size <= enumerative.MAX_SYMBOLS
