"""One entropy-coded stream: whichever of Huffman and rANS is smaller, told apart by its
first byte (a Huffman stream's version, 1; the rANS tag, 2).

Huffman is the paper's code and wins on tiny streams (its table is a length per symbol);
rANS spends fractions of a bit and wins wherever one symbol dominates or the stream is
long. Choosing per stream costs nothing at load time: the first byte says which decoder.
"""

from __future__ import annotations

import numpy as np

from penjing.codec import huffman, rans

CODERS = {huffman.FORMAT_VERSION: "huffman", rans.TAG: "rans"}
CODER_NAMES = ("huffman", "rans")


def check_coders(coders: object) -> tuple[str, ...]:
    """`coders` as a tuple of known coder names, or a ValueError saying which exist."""
    if isinstance(coders, str):
        coders = (coders,)
    if not isinstance(coders, tuple | list) or not coders or not set(coders) <= set(CODER_NAMES):
        raise ValueError(
            f"coders must be a non-empty subset of {CODER_NAMES}, got {coders!r}"
        )
    return tuple(coders)


def encode(symbols: np.ndarray, *, coders: tuple[str, ...] = CODER_NAMES) -> bytes:
    """The smallest encoding of `symbols` among `coders` (Huffman wins ties)."""
    coders = check_coders(coders)
    options = []
    if "huffman" in coders:
        options.append(huffman.encode(symbols))
    if "rans" in coders:
        try:
            options.append(rans.encode(symbols))
        except ValueError:
            # More distinct symbols than 16-bit frequencies can hold: Huffman only.
            if "huffman" not in coders:
                raise
    return min(options, key=len)


def coder(data: bytes | memoryview) -> str:
    """Which coder wrote a stream ('huffman' or 'rans'); ValueError if neither."""
    if len(data) == 0 or data[0] not in CODERS:
        first = data[0] if len(data) else None
        raise ValueError(f"entropy-coded stream starts with {first!r}, not a known coder tag")
    return CODERS[data[0]]


def decode(data: bytes | memoryview, *, max_symbols: int | None = None) -> np.ndarray:
    """Decode a stream made by `encode`; more than `max_symbols` symbols is a ValueError."""
    if coder(data) == "rans":
        return rans.decode(data, max_symbols=max_symbols)
    symbols = huffman.decode(data)
    if max_symbols is not None and symbols.size > max_symbols:
        raise ValueError(f"Huffman stream has {symbols.size} symbols, at most {max_symbols} "
                         "expected")
    return symbols
