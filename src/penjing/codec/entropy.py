"""One coded stream: whichever of Huffman, rANS, enumerative coding and plain packing is
smallest, told apart
by its first byte (a Huffman stream's version, 1; the fixed-width tag, 3; the enumerative
tag, 4; a rANS tag, 2 or 16..31).

rANS spends fractions of a bit and wins wherever one symbol dominates or the stream is
long; Huffman's table (a length per symbol) is smaller on short streams; a stream of a
few dozen symbols is cheapest at a fixed width with no table at all, and one of up to a
few thousand (a bias, a small layer) as its counts and rank (`enumerative`), which needs
neither a table nor a coder state. Choosing per
stream costs nothing at load time: the first byte says which decoder.

Fixed-width stream: u8 tag (3) | varint n | u8 width w (0..16) | n values of w bits (packed,
most significant bit first); its byte count must be exactly what n and w need.
"""

from __future__ import annotations

import numpy as np

from penjing.codec import enumerative, huffman, rans
from penjing.codec.bitpack import Reader, Work, pack_uints, packed_size, unpack_uints, varint

FIXED_TAG = 3
CODERS = {huffman.FORMAT_VERSION: "huffman", rans.TAG: "rans", FIXED_TAG: "fixed",
          enumerative.TAG: "enumerative"}
CODERS |= dict.fromkeys(rans.TAGS, "rans")
CODER_NAMES = ("huffman", "rans", "fixed", "enumerative")


def encode_fixed(symbols: np.ndarray) -> bytes:
    """`symbols` at the fixed width of the largest one, behind a 3-byte header."""
    arr = huffman.as_symbols(symbols)
    width = int(arr.max()).bit_length() if arr.size else 0
    return bytes([FIXED_TAG]) + varint(arr.size) + bytes([width]) + pack_uints(arr, width)


def decode_fixed(data: bytes | memoryview, *, max_symbols: int | None = None) -> np.ndarray:
    r = Reader(data, "fixed-width stream")
    if r.u8() != FIXED_TAG:
        raise ValueError("not a fixed-width stream")
    n, width = r.varint(), r.u8()
    if width > 16:
        raise ValueError(f"fixed-width stream has {width}-bit symbols, at most 16")
    limit = max_symbols if max_symbols is not None else 8 * len(r.data)
    if n > limit:
        raise ValueError(f"fixed-width stream claims {n} symbols, at most {limit} expected")
    values = unpack_uints(r.take(packed_size(n, width)), n, width)
    r.finish()
    return values.astype(np.uint16)


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
    """The smallest encoding of `symbols` among `coders`."""
    coders = check_coders(coders)
    options = []
    if "fixed" in coders:
        options.append(encode_fixed(symbols))
    if "huffman" in coders:
        options.append(huffman.encode(symbols))
    if "rans" in coders:
        try:
            options.append(rans.encode(symbols))
        except ValueError:
            # More distinct symbols than 16-bit frequencies can hold: Huffman only.
            if "huffman" not in coders:
                raise
    arr = huffman.as_symbols(symbols)
    if ("enumerative" in coders and arr.size <= enumerative.ENCODE_MAX_SYMBOLS
            and (arr.size == 0 or int(arr.max()) < enumerative.MAX_ALPHABET)):
        options.append(enumerative.encode(arr))
    if not options:
        raise ValueError(f"none of the coders {coders} takes this stream of {arr.size} "
                         "symbols; allow 'huffman'")
    # Ties go to the coder listed first in `options`: fixed, Huffman, rANS, enumerative.
    return min(options, key=len)


def coder(data: bytes | memoryview) -> str:
    """Which coder wrote a stream ('huffman' or 'rans'); ValueError if neither."""
    if len(data) == 0 or data[0] not in CODERS:
        first = data[0] if len(data) else None
        raise ValueError(f"entropy-coded stream starts with {first!r}, not a known coder tag")
    return CODERS[data[0]]


def work(data: bytes | memoryview) -> int:
    """The decode work (penjing.codec.bitpack.Work units) a stream's header says it needs
    beyond ~1 µs per symbol: a file's whole budget is checked before anything decodes."""
    if len(data) and data[0] == enumerative.TAG:
        return enumerative.work(data)
    return 0


def decode(data: bytes | memoryview, *, max_symbols: int | None = None,
           work: Work | None = None) -> np.ndarray:
    """Decode a stream made by `encode`; more than `max_symbols` symbols is a ValueError,
    and so is a stream whose decoding would exceed the `work` budget."""
    if coder(data) == "rans":
        return rans.decode(data, max_symbols=max_symbols)
    if coder(data) == "fixed":
        return decode_fixed(data, max_symbols=max_symbols)
    if coder(data) == "enumerative":
        return enumerative.decode(data, max_symbols=max_symbols, work=work)
    symbols = huffman.decode(data)
    if max_symbols is not None and symbols.size > max_symbols:
        raise ValueError(f"Huffman stream has {symbols.size} symbols, at most {max_symbols} "
                         "expected")
    return symbols
