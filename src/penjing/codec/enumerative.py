"""Enumerative coding of short symbol streams: the symbol counts, then the stream's rank
among every ordering of those counts, as one integer.

Huffman and rANS describe a stream's statistics with a table and pay for a coder state;
on a bias of 10–500 symbols that is ten bytes next to a payload of a few dozen. A stream
with counts c_0..c_{S-1} is one of n! / (c_0! ... c_{S-1}!) orderings, so its rank costs
log2 of that (a little under n times the empirical entropy), and the counts cost about
log2(n + 1) bits each. The whole stream is then one mixed-radix integer, written in the
fewest whole bytes: nothing else.

Stream layout: u8 tag (4) | varint n | varint S | the integer X, big-endian, in exactly
the bytes its capacity needs, where

    X = c_0 + (n + 1) · (c_1 + (n - c_0 + 1) · (... c_{S-2} ... + R_c · rank))

each count's radix being the symbols still unassigned plus one (c_{S-1} is the rest),
R_c their product, and rank < n! / Π c_s! the stream's position among the orderings of
its counts (lexicographic). Python's integers are exact at any size; the work per symbol
grows with the stream's coded size, so only streams of at most MAX_SYMBOLS use it.

    >>> data = encode(np.array([2, 0, 2, 1], dtype=np.uint16))
    >>> decode(data).tolist()
    [2, 0, 2, 1]
"""

from __future__ import annotations

from bisect import bisect_right
from math import comb, prod

import numpy as np

from penjing.codec.bitpack import Reader, Work, charge, varint
from penjing.codec.huffman import as_symbols

TAG = 4
MAX_SYMBOLS = 8192  # big-integer work grows as n x coded bits: ~0.1 s at most
# `save` codes at most this many symbols enumeratively: a stream's decode work (n times
# its bytes / 8, charged to the file's budget) then stays within the 32 units each of
# its bytes adds to the budget (docs/format.md). Longer streams of older files still
# decode, charged in full.
ENCODE_MAX_SYMBOLS = 256
MAX_ALPHABET = 64  # each symbol also updates the counts of the symbols above it


def _radices(n: int, counts: list[int]) -> list[int]:
    """The radix of each stored count: the symbols not yet counted, plus one."""
    radices, left = [], n
    for c in counts[:-1]:
        radices.append(left + 1)
        left -= c
    return radices


def _capacity(n: int, counts: list[int]) -> tuple[int, int]:
    """(product of the count radices, number of orderings) for `counts` summing to n."""
    orderings, left = 1, n
    for c in counts:  # n! / prod(c!) as a product of binomials
        orderings *= comb(left, c)
        left -= c
    return prod(_radices(n, counts)), orderings


def encode(symbols: np.ndarray) -> bytes:
    """Enumeratively code a stream of at most MAX_SYMBOLS symbols below MAX_ALPHABET."""
    arr = as_symbols(symbols)
    n = arr.size
    if n > MAX_SYMBOLS:
        raise ValueError(f"enumerative coding takes at most {MAX_SYMBOLS} symbols, got {n}")
    size = int(arr.max()) + 1 if n else 0
    if size > MAX_ALPHABET:
        raise ValueError(f"enumerative coding takes symbols below {MAX_ALPHABET}, got "
                         f"{size - 1}")
    counts = np.bincount(arr, minlength=size).tolist() if n else []
    below = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist() if n else []
    left = list(counts)
    radix_product, total = _capacity(n, counts)
    rank, orderings, m = 0, total, n
    for s in arr.tolist():
        # Orderings that put a smaller symbol here come first: orderings * (count of
        # smaller symbols left) / m of them.
        smaller = below[s]
        if smaller:
            rank += orderings * smaller // m
        orderings = orderings * left[s] // m
        left[s] -= 1
        for t in range(s + 1, size):  # kept current: symbols after s have one fewer below
            below[t] -= 1
        m -= 1
    value = rank
    for c, radix in zip(reversed(counts[:-1]), reversed(_radices(n, counts)), strict=True):
        value = value * radix + c
    width = _width(radix_product * total)
    return bytes([TAG]) + varint(n) + varint(size) + value.to_bytes(width, "big")


def _width(capacity: int) -> int:
    """Bytes that hold every integer below `capacity`."""
    return ((capacity - 1).bit_length() + 7) // 8


def work(data: bytes | memoryview) -> int:
    """What `decode` will charge for this stream (0 for a header it cannot read: decoding
    then refuses it for free)."""
    try:
        r = Reader(data, "enumerative stream")
        r.u8()
        n, _ = r.varint(), r.varint()
    except ValueError:
        return 0
    return n * max(1, (len(r.data) - r.pos) // 8)


def decode(data: bytes | memoryview, *, max_symbols: int | None = None,
           work: Work | None = None) -> np.ndarray:
    """Decode a stream made by `encode`; corrupt input is a ValueError. Each symbol is a
    few operations on an integer of the stream's size: that work is charged to `work`
    before it is done."""
    r = Reader(data, "enumerative stream")
    if r.u8() != TAG:
        raise ValueError("not an enumerative stream")
    n, size = r.varint(), r.varint()
    limit = MAX_SYMBOLS if max_symbols is None else min(max_symbols, MAX_SYMBOLS)
    if n > limit:
        raise ValueError(f"enumerative stream claims {n} symbols, at most {limit} expected")
    if size > MAX_ALPHABET or (n == 0) != (size == 0):
        raise ValueError(f"enumerative stream of {n} symbols over {size}: corrupt")
    width = len(r.data) - r.pos
    # Every stream of n symbols over `size` fits in (n + 1)^(size - 1) * size^n: a longer
    # one is corrupt, and is refused before its bytes become an integer.
    if width > _width((n + 1) ** max(size - 1, 0) * max(size, 1) ** n):
        raise ValueError(f"enumerative stream of {n} symbols has {width} bytes: corrupt")
    charge(work, n * max(1, width // 8), f"an enumerative stream of {n:,} symbols in "
           f"{width:,} bytes")
    value = int.from_bytes(bytes(r.data[r.pos:]), "big")
    r.pos = len(r.data)
    counts, rest = [], n
    for _ in range(size - 1):
        c = value % (rest + 1)
        value //= rest + 1
        counts.append(c)
        rest -= c
    counts.append(rest)
    radix_product, total = _capacity(n, counts)
    if value >= total or width != _width(radix_product * total):
        raise ValueError("enumerative stream's rank or length does not fit its counts: corrupt")
    cumulative = np.cumsum(counts).tolist()  # symbols left at or below each symbol
    left = list(counts)
    out = np.empty(n, dtype=np.uint16)
    rank, orderings, m = value, total, n
    for i in range(n):
        v = rank * m // orderings  # symbols left that come before the one here
        s = bisect_right(cumulative, v)
        below = cumulative[s] - left[s]
        rank -= orderings * below // m
        orderings = orderings * left[s] // m
        left[s] -= 1
        for t in range(s, size):
            cumulative[t] -= 1
        m -= 1
        out[i] = s
    return out
