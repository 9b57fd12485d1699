"""Canonical Huffman coding of integer symbol streams, vectorised with numpy.

Deep Compression (Han et al., ICLR 2016) Huffman-codes the codebook indices and the
relative-index gaps; their skewed distributions save 20-30% over fixed-width codes.

Stream layout (all written by `encode`, read by `decode`):

    u8 version | u8 max code length L | u8 table mode | u8 bits per code length
    varint n symbols | varint chunk C | varint payload bits
    code table: mode 0 = varint S, then a length for each symbol 0..S-1;
                mode 1 = varint k, u8 symbol width, k symbols, then their k lengths
    sync table: bit offset of symbol C, 2C, ... (packed, width = payload bits' bit length)
    payload: the concatenated codes, most significant bit first

The sync table lets `decode` run all chunks in lockstep: C numpy steps, each decoding one
symbol of every chunk at once, instead of one Python step per symbol.

    >>> data = encode(np.array([3, 3, 3, 1, 0, 3], dtype=np.uint16))
    >>> decode(data).tolist()
    [3, 3, 3, 1, 0, 3]
"""

from __future__ import annotations

import heapq

import numpy as np

from penjing.codec.bitpack import Reader, pack_uints, packed_size, unpack_uints, varint

FORMAT_VERSION = 1
MAX_SYMBOLS = 1 << 16  # symbols are codebook indices or gaps of at most 16 bits
MAX_CODE_LEN = 24  # a 24-bit code plus a 7-bit offset still fits one 32-bit window
DEFAULT_CHUNK = 1024  # symbols per sync point: ~0.03 bits/symbol of sync overhead
# Lockstep decoding takes min(chunk, n) numpy steps: a longer chunk (up to one chunk for
# the whole stream) would decode one Python step per symbol, ~1000x slower.
MAX_CHUNK = 4096
_TABLE_BITS = 16  # first-level decode table of 64 Ki entries stays in cache
_BLOCK = 1 << 20  # encoder works on blocks of symbols to bound its temporary memory
_JUMP_WORK = 1 << 22  # bits x log2(symbols) below which pointer jumping beats lockstep


def as_symbols(symbols: np.ndarray) -> np.ndarray:
    """`symbols` as a flat uint16 array, checked to be integers in [0, MAX_SYMBOLS)."""
    arr = np.asarray(symbols)
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint16)
    if arr.dtype.kind not in "ui":
        raise TypeError(
            f"symbols must be an integer array, got dtype {arr.dtype}; cast with .astype(np.uint16)"
        )
    arr = arr.ravel()
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= MAX_SYMBOLS:
        raise ValueError(
            f"symbols must be in [0, {MAX_SYMBOLS}), got values in [{lo}, {hi}]; "
            "map them to a smaller alphabet first"
        )
    return arr.astype(np.uint16, copy=False)


def _check_max_len(max_len: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if not 1 <= max_len <= MAX_CODE_LEN:
        raise ValueError(f"max_len must be in 1..{MAX_CODE_LEN}, got {max_len}")


def _depth_counts(weights: np.ndarray) -> np.ndarray:
    """Number of leaves at each depth of a Huffman tree over `weights` (at least 2)."""
    k = len(weights)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * k - 1)
    node = k
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    # Parents are created after their children, so one backwards pass sets every depth.
    depth = [0] * (2 * k - 1)
    for i in range(2 * k - 3, -1, -1):
        depth[i] = depth[parent[i]] + 1
    return np.bincount(np.array(depth[:k]))


def _limit_depths(counts: np.ndarray, max_len: int) -> np.ndarray:
    """Move leaves deeper than `max_len` up while keeping the Kraft sum exactly 1.

    The JPEG (ITU T.81, Annex K.3) adjustment: two sibling leaves at the deepest level i
    leave; one replaces their parent at i-1, the other pairs with a leaf from some
    shallower level j, which becomes two leaves at j+1. Loops per code length, not symbol.
    """
    bl = [int(c) for c in counts]
    for i in range(len(bl) - 1, max_len, -1):
        while bl[i] > 0:
            j = i - 2
            while j > 0 and bl[j] == 0:
                j -= 1
            if j == 0:
                raise ValueError(f"cannot fit {sum(bl)} symbols into codes of {max_len} bits")
            bl[i] -= 2
            bl[i - 1] += 1
            bl[j + 1] += 2
            bl[j] -= 1
    return np.array(bl[: max_len + 1], dtype=np.int64)


def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Huffman code length of each symbol from its count (0 for absent symbols).

    Lengths never exceed `max_len`; a lone symbol gets a 1-bit code so it still takes space.
    """
    _check_max_len(max_len)
    counts = np.asarray(counts)
    if counts.ndim != 1 or (counts.size and counts.dtype.kind not in "ui"):
        raise TypeError(f"counts must be a 1-D integer array, got {counts.dtype} {counts.shape}")
    counts = counts.astype(np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError(f"counts must be non-negative, got minimum {counts.min()}")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    present = np.flatnonzero(counts)
    k = present.size
    if k <= 1:
        lengths[present] = 1
        return lengths
    if k > 1 << max_len:
        raise ValueError(f"{k} symbols cannot have codes of at most {max_len} bits; raise max_len")
    per_depth = _limit_depths(_depth_counts(counts[present]), max_len)
    # The most frequent symbols take the shortest codes; ties go by symbol, so the result
    # does not depend on heap order.
    order = np.lexsort((present, -counts[present]))
    lengths[present[order]] = np.repeat(np.arange(per_depth.size), per_depth)
    return lengths


def _canonical_order(lengths: np.ndarray) -> np.ndarray:
    present = np.flatnonzero(lengths)
    return present[np.lexsort((present, lengths[present]))]


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol (uint32) from its length, as in DEFLATE (RFC 1951 3.2.2).

    Codes of equal length are consecutive in symbol order, so the lengths alone define the
    code and are all a stream has to store.
    """
    lengths = np.asarray(lengths).astype(np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    order = _canonical_order(lengths)
    if order.size == 0:
        return codes
    ls = lengths[order]
    top = int(ls[-1])
    if int(np.sum(np.int64(1) << (top - ls))) > 1 << top:
        raise ValueError("code lengths break the Kraft inequality: no prefix code has them")
    per_len = np.bincount(ls, minlength=top + 1)
    first = np.zeros(top + 1, dtype=np.int64)
    code = 0
    for bits in range(1, top + 1):
        code = (code + int(per_len[bits - 1])) << 1
        first[bits] = code
    group_start = np.cumsum(per_len) - per_len
    rank = np.arange(order.size) - group_start[ls]
    codes[order] = first[ls] + rank
    return codes


def _pack_codes(codes: np.ndarray, lens: np.ndarray) -> tuple[bytes, int, np.ndarray]:
    """Concatenate variable-length codes into bytes; returns (payload, bits, bit starts).

    Each code is placed in a 32-bit big-endian window at its start byte. Codes never share
    a bit, so windows that start in the same byte merge with one OR-reduce, and each byte
    is then the OR of the 4 windows that can reach it: a fixed number of array passes.
    """
    lens = lens.astype(np.int64)
    ends = np.cumsum(lens)
    total = int(ends[-1])
    starts = ends - lens
    acc = np.zeros((total + 7) // 8 + 3, dtype=np.int64)
    for lo in range(0, lens.size, _BLOCK):
        s = starts[lo : lo + _BLOCK]
        shift = s & 7
        shift += lens[lo : lo + _BLOCK]
        np.subtract(32, shift, out=shift)
        window = codes[lo : lo + _BLOCK].astype(np.int64)
        window <<= shift
        byte = s >> 3
        new_byte = np.empty(byte.size, dtype=bool)
        new_byte[0] = True
        np.not_equal(byte[1:], byte[:-1], out=new_byte[1:])
        head = np.flatnonzero(new_byte)
        base = int(byte[0])
        span = int(byte[-1]) - base + 1
        # padded[3 + r] is the merged window of relative byte r; 3 zeros on either side
        # let the four shifted views below line up without bounds checks.
        padded = np.zeros(span + 6, dtype=np.int64)
        padded[3 + byte[head] - base] = np.bitwise_or.reduceat(window, head)
        merged = padded[3:] >> 24
        merged |= (padded[2:-1] >> 16) & 0xFF
        merged |= (padded[1:-2] >> 8) & 0xFF
        merged |= padded[:-3] & 0xFF
        acc[base : base + span + 3] |= merged
    return acc[: (total + 7) // 8].astype(np.uint8).tobytes(), total, starts


def _table_bytes(lengths: np.ndarray, len_width: int) -> tuple[int, bytes]:
    """Code table in whichever of the two layouts is smaller: (mode, bytes)."""
    present = np.flatnonzero(lengths)
    dense = varint(lengths.size) + pack_uints(lengths, len_width)
    sym_width = max(1, int(present[-1]).bit_length()) if present.size else 1
    sparse = (
        varint(present.size)
        + bytes([sym_width])
        + pack_uints(present, sym_width)
        + pack_uints(lengths[present], len_width)
    )
    return (0, dense) if len(dense) <= len(sparse) else (1, sparse)


def encode(
    symbols: np.ndarray, *, max_len: int = MAX_CODE_LEN, chunk: int = DEFAULT_CHUNK
) -> bytes:
    """Huffman-code a stream of symbols in [0, 65536) into a self-describing byte string."""
    _check_max_len(max_len)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be an int in 1..{MAX_CHUNK}, got {chunk!r}")
    arr = as_symbols(symbols)
    n = arr.size
    if n == 0:
        return bytes([FORMAT_VERSION, 0, 0, 1]) + varint(0) + varint(chunk) + varint(0) + varint(0)
    lengths = code_lengths(np.bincount(arr), max_len)
    top = int(lengths.max())
    len_width = top.bit_length()
    payload, total, starts = _pack_codes(canonical_codes(lengths)[arr], lengths[arr])
    mode, table = _table_bytes(lengths, len_width)
    sync = pack_uints(starts[chunk::chunk], total.bit_length())
    head = bytes([FORMAT_VERSION, top, mode, len_width])
    return head + varint(n) + varint(chunk) + varint(total) + table + sync + payload


def _read_table(r: Reader, mode: int, len_width: int) -> np.ndarray:
    if mode == 0:
        size = r.varint()
        if size > MAX_SYMBOLS:
            raise ValueError(f"code table has {size} symbols, more than {MAX_SYMBOLS}")
        return unpack_uints(r.take(packed_size(size, len_width)), size, len_width).astype(np.int64)
    if mode == 1:
        k = r.varint()
        sym_width = r.u8()
        if k > MAX_SYMBOLS or not 1 <= sym_width <= 16:
            raise ValueError(f"code table lists {k} symbols of {sym_width} bits: corrupt")
        syms = unpack_uints(r.take(packed_size(k, sym_width)), k, sym_width).astype(np.int64)
        lens = unpack_uints(r.take(packed_size(k, len_width)), k, len_width).astype(np.int64)
        if k and (np.any(np.diff(syms) <= 0) or np.any(lens == 0)):
            raise ValueError("code table symbols are not strictly increasing: corrupt")
        lengths = np.zeros(int(syms[-1]) + 1 if k else 0, dtype=np.int64)
        lengths[syms] = lens
        return lengths
    raise ValueError(f"unknown code table mode {mode}: corrupt stream")


class _Decoder:
    """Lookup tables for one canonical code: a direct table plus a search for long codes."""

    def __init__(self, lengths: np.ndarray, top: int) -> None:
        order = _canonical_order(lengths)
        ls = lengths[order]
        codes = canonical_codes(lengths)[order].astype(np.int64)
        self.top = top
        self.bits = min(top, _TABLE_BITS)
        short = ls <= self.bits
        reps = np.int64(1) << (self.bits - ls[short])
        size = 1 << self.bits
        # Canonical codes, left-aligned, are increasing, so table runs come out in order;
        # the rest of the table (long codes, or unused space) keeps length 0.
        self.sym = np.zeros(size, dtype=np.uint16)
        self.len = np.zeros(size, dtype=np.int64)
        filled = int(reps.sum())
        self.sym[:filled] = np.repeat(order[short], reps)
        self.len[:filled] = np.repeat(ls[short], reps)
        self.limit = (codes + 1) << (top - ls)  # end of each code's left-aligned interval
        self.order = order.astype(np.uint16)
        self.ls = ls

    def lookup(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.top <= self.bits:
            return np.take(self.sym, window), np.take(self.len, window)
        first = window >> (self.top - self.bits)
        sym, length = np.take(self.sym, first), np.take(self.len, first)
        miss = np.flatnonzero(length == 0)
        if miss.size:
            idx = np.searchsorted(self.limit, window[miss], side="right")
            valid = idx < self.order.size
            idx = np.minimum(idx, self.order.size - 1)
            sym[miss] = self.order[idx]
            length[miss] = np.where(valid, self.ls[idx], 0)
        return sym, length


def decode(data: bytes | memoryview) -> np.ndarray:
    """Decode a stream made by `encode` into its symbols (uint16); corrupt input is a ValueError."""
    r = Reader(data, "Huffman stream")
    version, top, mode, len_width = r.u8(), r.u8(), r.u8(), r.u8()
    if version != FORMAT_VERSION:
        raise ValueError(f"Huffman stream version {version} is unknown; expected {FORMAT_VERSION}")
    n, chunk, total = r.varint(), r.varint(), r.varint()
    if not 1 <= chunk <= MAX_CHUNK or not 1 <= len_width <= 5:
        raise ValueError(
            f"Huffman stream header is corrupt (chunk {chunk}, at most {MAX_CHUNK}; "
            f"length width {len_width}, 1..5)"
        )
    # Every code takes at least one bit: bound n and the payload by the bytes present
    # before allocating anything sized by them.
    room = 8 * (len(r.data) - r.pos)
    if total > room or n > total:
        raise ValueError(
            f"Huffman stream claims {n} symbols in {total} bits, but only {room} bits follow "
            "its header: corrupt stream"
        )
    lengths = _read_table(r, mode, len_width)
    if n == 0:
        r.finish()
        if total or lengths.any():
            raise ValueError("empty Huffman stream has a payload or code table: corrupt")
        return np.zeros(0, dtype=np.uint16)
    if not 1 <= top <= MAX_CODE_LEN or lengths.size == 0 or int(lengths.max()) != top:
        raise ValueError(f"Huffman stream header says codes of {top} bits, table disagrees")
    if not n <= total <= n * top:
        raise ValueError(f"{n} symbols cannot take {total} bits with codes of 1..{top} bits")
    nchunks = -(-n // chunk)
    sync = unpack_uints(
        r.take(packed_size(nchunks - 1, total.bit_length())), nchunks - 1, total.bit_length()
    ).astype(np.int64)
    payload = np.frombuffer(r.take((total + 7) // 8), dtype=np.uint8)
    r.finish()
    starts = np.concatenate([[0], sync])
    if np.any(np.diff(starts) < 0) or starts[-1] > total:
        raise ValueError("Huffman sync table is not increasing: corrupt stream")
    dec = _Decoder(lengths, top)
    padded = np.concatenate([payload, np.zeros(3, dtype=np.uint8)])
    # words[i]: the 32 bits starting at byte i, so any code's window is one gather away.
    # Built in place: 8 bytes per payload byte, no int64 temporaries.
    words = padded[:-3].astype(np.int64)
    for k in (1, 2, 3):
        words <<= 8
        words |= padded[k : k + payload.size]
    if total * n.bit_length() <= _JUMP_WORK:
        symbols, code_starts = _decode_jumping(dec, words, n, total)
        if not np.array_equal(code_starts[chunk::chunk], starts[1:]):
            raise ValueError("Huffman payload does not match its sync table: corrupt stream")
        return symbols
    return _decode_lockstep(dec, words, starts, n, chunk, total)


def _window(dec: _Decoder, words: np.ndarray, bit: np.ndarray) -> np.ndarray:
    """The `dec.top` bits of the payload that start at each bit position in `bit`."""
    window = np.take(words, bit >> 3, mode="clip")
    window <<= bit & 7
    window >>= 32 - dec.top
    window &= (1 << dec.top) - 1
    return window


def _decode_lockstep(
    dec: _Decoder, words: np.ndarray, starts: np.ndarray, n: int, chunk: int, total: int
) -> np.ndarray:
    """Decode every chunk at once, one symbol per chunk per numpy step (for long streams)."""
    nchunks = starts.size
    steps = min(chunk, n)
    last = n - (nchunks - 1) * chunk  # symbols in the final, possibly short, chunk
    pos = starts.copy()
    out = np.empty((steps, nchunks), dtype=np.uint16)
    active = nchunks
    for t in range(steps):
        if t == last:
            active = nchunks - 1
        p = pos[:active]
        sym, length = dec.lookup(_window(dec, words, p))
        out[t, :active] = sym
        p += length
    if not np.array_equal(pos, np.append(starts[1:], total)):
        raise ValueError("Huffman payload does not match its sync table: corrupt stream")
    return out.T.reshape(-1)[:n]


def _decode_jumping(
    dec: _Decoder, words: np.ndarray, n: int, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a short stream by pointer jumping: (symbols, bit start of each symbol).

    Every bit position is decoded as if a code started there, giving next[bit]; the real
    code starts are bit 0's orbit under next, found in log2(n) doubling steps. Costs
    O(bits * log n) work but only log n numpy calls, where lockstep needs `chunk` calls.
    """
    bit = np.arange(total, dtype=np.int64)
    sym_at, len_at = dec.lookup(_window(dec, words, bit))
    # An invalid code has length 0, so its bit is its own next: the walk stalls there and
    # the check below catches it. Position `total` is a sink for walks that overrun.
    jump = np.append(np.minimum(bit + len_at, total), total)
    code_starts = np.zeros(1, dtype=np.int64)
    while code_starts.size < n:
        # Knowing the first m starts, the next m are `jump` (= next applied m times) of them.
        code_starts = np.concatenate([code_starts, jump[code_starts]])
        jump = jump[jump]
    code_starts = code_starts[:n]
    last = code_starts[-1]
    if np.any(np.diff(code_starts) <= 0) or last >= total or last + len_at[last] != total:
        raise ValueError("Huffman payload does not decode to its symbol count: corrupt stream")
    return sym_at[code_starts], code_starts


def entropy_bits(symbols: np.ndarray) -> float:
    """Shannon entropy of a stream in bits/symbol: the floor for any symbol-by-symbol code."""
    arr = as_symbols(symbols)
    if arr.size == 0:
        return 0.0
    counts = np.bincount(arr)
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log2(p)).sum())


def fixed_width_bits(alphabet_size: int) -> int:
    """Bits/symbol of a fixed-width code over `alphabet_size` symbols: ceil(log2(size))."""
    if alphabet_size < 0:
        raise ValueError(f"alphabet_size must be non-negative, got {alphabet_size}")
    return max(alphabet_size - 1, 0).bit_length()


def coded_bits(symbols: np.ndarray, *, max_len: int = MAX_CODE_LEN) -> int:
    """Payload bits the Huffman code spends on `symbols` (no table, no sync points)."""
    arr = as_symbols(symbols)
    if arr.size == 0:
        return 0
    counts = np.bincount(arr)
    return int((counts * code_lengths(counts, max_len).astype(np.int64)).sum())
