"""Fixed-width bit packing, varints and a bounds-checked reader: the small binary pieces
every codec stream is built from, so stream parsers fail with ValueError, never IndexError.
"""

from __future__ import annotations

import numpy as np


def packed_size(count: int, width: int) -> int:
    """Bytes that `count` values of `width` bits take once packed (the last byte padded)."""
    return (count * width + 7) // 8


def pack_uints(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers into `width` bits each, most significant bit first.

    Vectorised: the values are expanded to a (count, width) bit matrix and packed at once.
    """
    if not 0 <= width <= 64:
        raise ValueError(f"width must be in 0..64 bits, got {width}")
    v = np.asarray(values).astype(np.uint64, copy=False).ravel()
    if v.size == 0 or width == 0:
        if v.size and v.max() != 0:
            raise ValueError("width 0 can only hold zeros; widen the field")
        return b""
    if width < 64 and int(v.max()) >> width:
        raise ValueError(f"value {int(v.max())} does not fit in {width} bits; widen the field")
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel()).tobytes()


def unpack_uints(data: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of `pack_uints`: `count` integers of `width` bits as a uint64 array."""
    if not 0 <= width <= 64:
        raise ValueError(f"width must be in 0..64 bits, got {width}")
    need = packed_size(count, width)
    if len(data) < need:
        raise ValueError(f"packed field needs {need} bytes, got {len(data)}")
    if count == 0 or width == 0:
        return np.zeros(count, dtype=np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8, count=need)
    bits = np.unpackbits(raw)[: count * width].reshape(count, width).astype(np.uint64)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (bits << shifts).sum(axis=1, dtype=np.uint64)


def varint(value: int) -> bytes:
    """LEB128 encoding of a non-negative int: small header numbers cost one byte, not eight."""
    if value < 0:
        raise ValueError(f"varint holds non-negative integers, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Reader:
    """Reads a byte string front to back; running out or leaving bytes over is a ValueError."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(
                f"{self.what} is truncated: needs {n} more bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise ValueError(f"{self.what} has a varint longer than 64 bits at offset {self.pos}")

    def finish(self) -> None:
        extra = len(self.data) - self.pos
        if extra:
            raise ValueError(f"{self.what} has {extra} unexpected bytes after its end")


class Work:
    """What a file may cost to decode, in units of about 0.1 µs of this machine's Python:
    decoders that loop in Python per symbol or per step (`rans`, `enumerative`) charge
    their work here before doing it, so a small hostile file cannot buy minutes of CPU.
    Vectorised work (Huffman, packing, gathers) costs a few ns per byte and is not counted.
    """

    def __init__(self, limit: int, why: str) -> None:
        self.limit, self.spent, self.why = limit, 0, why

    def spend(self, units: int, what: str) -> None:
        """Charge `units` for `what`, or a ValueError when the budget would be exceeded."""
        self.spent += units
        if self.spent > self.limit:
            raise ValueError(
                f"decoding needs more work than the file's budget allows ({what} brings it "
                f"to {self.spent:,} units, the budget is {self.limit:,}: {self.why}); the "
                "file was not written by penjing.codec.save, or is damaged")


def charge(work: Work | None, units: int, what: str) -> None:
    """`work.spend(units, what)` when there is a budget."""
    if work is not None:
        work.spend(units, what)

