"""Interleaved rANS coding of integer symbol streams, vectorised with numpy.

Huffman spends a whole number of bits per symbol, which costs most where one symbol
dominates (a dense code stream of a pruned layer is mostly zeros: 0.7 bits of entropy
coded in 1.3). Asymmetric numeral systems (Duda 2013; the rANS variant of Giesen's
`ryg_rans`) spend fractions of a bit and get within a fraction of a percent of the
entropy. This coder keeps a 32-bit state per lane, renormalises in 16-bit words (at most
one word per symbol) and runs K lanes in lockstep: symbol i belongs to lane i mod K, so
decoding is ceil(n / K) numpy steps over K lanes instead of n Python steps.

Stream layout (all written by `encode`, read by `decode`):

    u8 tag 15 + P, for precision P in 1..16 | varint 2n + (K > 1) for n symbols and K
    lanes | varint K, only when K > 1
    frequency table: varint S, varint top symbol T < S, u8 width w (0..16), then the
                     frequencies of symbols 0..S-1 except T, w bits each (packed, most
                     significant bit first); T's is 2^P minus their sum, and at least 1
    K final states (u32, little-endian), then the payload: 16-bit words (little-endian)
    up to the end of the stream

The first byte tells the stream apart from a Huffman stream (whose version byte is 1) and
a fixed-width one (3). Streams written before this layout (tag 2, then u8 P, varint n,
varint K, the rest as above) still decode: two bytes longer, for nothing.
Every lane starts encoding at state 2^16 and so must end decoding there: together with
the payload being consumed exactly, that is a check that comes for free.

    >>> data = encode(np.array([3, 3, 3, 1, 0, 3], dtype=np.uint16))
    >>> decode(data).tolist()
    [3, 3, 3, 1, 0, 3]
"""

from __future__ import annotations

import numpy as np

from penjing.codec.bitpack import (
    Reader,
    pack_uints,
    packed_size,
    unpack_uints,
    varint,
)
from penjing.codec.huffman import MAX_SYMBOLS, as_symbols

TAG = 2  # the first layout, read but no longer written
TAGS = range(16, 32)  # 15 + precision
MAX_PRECISION = 16  # frequencies of at most 16 bits keep renormalisation to one word
MAX_LANES = 1 << 16
# Lockstep decoding takes ceil(n / lanes) numpy steps of ~20 us each; a stream of more
# than SCALAR_LIMIT symbols must keep that to MAX_STEPS, which bounds its decode time
# (as Huffman's chunk does), hostile headers included. Up to SCALAR_LIMIT symbols a
# plain Python loop decodes one lane (~0.5 us a symbol, at most ~0.5 s): a mid-sized
# layer (a few hundred thousand weights, ~70 k coded bits) then pays for one lane state
# instead of dozens, each ~24 bits.
MAX_STEPS = 8192
SCALAR_LIMIT = 1 << 20
_LOW = 1 << 16  # states live in [2^16, 2^32) between symbols
# A lane costs ~24 bits: a 32-bit final state of which 16 bits repeat the initial state.
# Long streams (at least _MANY symbols) get one lane per this many payload bits (~0.3 %
# overhead), and at least one per _LONG_STEPS symbols (0.004 bits a symbol) as long as
# each carries _FEWEST_BITS of payload (2.3 %): a sparse stream spends few bits, and with
# one lane per 8192 bits its ~8,000 lockstep steps of a few lanes each decoded 47 M
# symbols/s; at most 6,144 steps pass 50 M/s.
_BITS_PER_LANE = 8192
_LONG_STEPS = 6144
_FEWEST_BITS = 1024
_MANY = 1 << 20
_LOCKSTEP_LANES = 32  # from this many lanes numpy steps beat a Python loop over symbols


def normalize(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies adding up to 2^precision, every present symbol at least 1, close to
    minimising the coded size sum(count * log2(2^precision / freq)).

    Starts from the rounded-down share and hands the remainder out (or takes the excess
    back) where one step of frequency gains (loses) the most bits.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = 1 << precision
    present = counts > 0
    k = int(present.sum())
    if k > total:
        raise ValueError(f"{k} symbols cannot have frequencies adding up to 2^{precision}")
    n = int(counts.sum())
    freq = np.where(present, np.maximum(1, counts * total // max(n, 1)), 0)
    c = counts.astype(np.float64)
    while (diff := total - int(freq.sum())) != 0:
        if diff > 0:
            gain = np.where(present, c * np.log2((freq + 1) / np.maximum(freq, 1)), -1.0)
            pick = np.argsort(-gain, kind="stable")[: min(diff, k)]
            freq[pick] += 1
        else:
            movable = freq > 1
            ratio = freq / np.maximum(freq - 1, 1)
            loss = np.where(movable, c * np.log2(np.where(movable, ratio, 1.0)), np.inf)
            pick = np.argsort(loss, kind="stable")[: min(-diff, int(movable.sum()))]
            freq[pick] -= 1
    return freq


def _table_bytes(freq: np.ndarray) -> bytes:
    """S, the most frequent symbol (its frequency is implied: they add up to 2^precision),
    a width, and the other S - 1 frequencies in that many bits each."""
    top = int(np.argmax(freq))
    rest = np.delete(freq, top)
    width = int(rest.max()).bit_length() if rest.size else 0
    return varint(freq.size) + varint(top) + bytes([width]) + pack_uints(rest, width)


def _cost_bits(counts: np.ndarray, freq: np.ndarray, precision: int) -> float:
    present = counts > 0
    return float((counts[present] * (precision - np.log2(freq[present]))).sum())


def choose_precision(counts: np.ndarray) -> tuple[int, np.ndarray]:
    """The precision (and its frequencies) with the fewest payload + table bits.

    A short stream cannot afford a finely quantised table; a long one can.
    """
    counts = np.asarray(counts, dtype=np.int64)
    k = int((counts > 0).sum())
    best = None
    for precision in range(max(1, (k - 1).bit_length()), MAX_PRECISION + 1):
        freq = normalize(counts, precision)
        bits = _cost_bits(counts, freq, precision) + 8 * len(_table_bytes(freq))
        if best is None or bits < best[0]:
            best = (bits, precision, freq)
    return best[1], best[2]


def min_lanes(n: int) -> int:
    """The fewest lanes a stream of `n` symbols may have: one up to SCALAR_LIMIT symbols,
    beyond that enough to decode in at most MAX_STEPS lockstep steps."""
    return 1 if n <= SCALAR_LIMIT else -(-n // MAX_STEPS)


def default_lanes(n: int, payload_bits: float) -> int:
    """Lanes for a stream: the fewest it may have (each costs ~24 bits); for a long one,
    enough for fast lockstep decoding while they stay ~0.3 % of the payload."""
    lanes = min_lanes(n)
    if n >= _MANY:
        fast = min(-(-n // _LONG_STEPS), int(payload_bits // _FEWEST_BITS))
        lanes = max(lanes, int(payload_bits // _BITS_PER_LANE), fast)
    return min(lanes, MAX_LANES, max(n, 1))


def encode(symbols: np.ndarray, *, lanes: int | None = None) -> bytes:
    """rANS-code a stream of symbols in [0, 65536) into a self-describing byte string.

    A stream over more distinct symbols than 2^16 frequencies can hold is a ValueError
    (Huffman codes it instead).
    """
    arr = as_symbols(symbols)
    n = arr.size
    if n == 0:
        return bytes([TAGS[0]]) + varint(0) + _table_bytes(np.array([2]))
    counts = np.bincount(arr)
    if int((counts > 0).sum()) > 1 << MAX_PRECISION:
        raise ValueError(f"rANS holds at most {1 << MAX_PRECISION} distinct symbols")
    precision, freq = choose_precision(counts)
    if lanes is None:
        lanes = default_lanes(n, _cost_bits(counts, freq, precision))
    lanes = min(lanes, n) if isinstance(lanes, int) else lanes
    if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= MAX_LANES:
        raise ValueError(f"lanes must be an int in 1..{MAX_LANES}, got {lanes!r}")
    if lanes < min_lanes(n):
        raise ValueError(
            f"{n} symbols need at least {min_lanes(n)} lanes (at most {MAX_STEPS} lockstep "
            f"decode steps), got {lanes}"
        )
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    coder = _encode_scalar if lanes < _LOCKSTEP_LANES else _encode_lockstep
    state, payload = coder(arr, lanes, freq, cum, precision)
    head = bytes([TAGS[precision - 1]]) + varint(2 * n + (lanes > 1))
    head += varint(lanes) if lanes > 1 else b""
    return head + _table_bytes(freq) + state.astype("<u4").tobytes() + payload.tobytes()


def _encode_scalar(arr, lanes, freq, cum, precision):
    """Encode one symbol at a time, last first: (final states, payload words)."""
    x = [_LOW] * lanes
    f_l, c_l = freq.tolist(), cum.tolist()
    shift = 32 - precision
    words = []
    n = arr.size
    for i, s in zip(range(n - 1, -1, -1), arr[::-1].tolist(), strict=True):
        lane = i % lanes
        v = x[lane]
        f = f_l[s]
        if v >= f << shift:
            words.append(v & 0xFFFF)
            v >>= 16
        x[lane] = ((v // f) << precision) + v % f + c_l[s]
    # The decoder reads words in the reverse of the order they were written.
    return np.array(x, dtype=np.uint64), np.array(words[::-1], dtype="<u2")


def _encode_lockstep(arr, lanes, freq, cum, precision):
    """Encode every lane at once, last step first: (final states, payload words)."""
    n = arr.size
    f64, c64 = freq.astype(np.uint64), cum.astype(np.uint64)
    state = np.full(lanes, _LOW, dtype=np.uint64)
    steps = -(-n // lanes)
    padded = np.zeros(steps * lanes, dtype=np.uint16)
    padded[:n] = arr
    grid = padded.reshape(steps, lanes)
    chunks = []
    shift = np.uint64(32 - precision)
    p = np.uint64(precision)
    for t in range(steps - 1, -1, -1):
        active = lanes if t < steps - 1 else n - t * lanes
        x = state[:active]
        s = grid[t, :active]
        f = f64[s]
        emit = x >= (f << shift)
        chunks.append((x[emit] & np.uint64(0xFFFF)).astype("<u2"))
        x[emit] >>= np.uint64(16)
        x[:] = ((x // f) << p) + (x % f) + c64[s]
    # Steps are read first to last, lanes in order within a step.
    return state, np.concatenate(chunks[::-1])


def decode(data: bytes | memoryview, *, max_symbols: int | None = None) -> np.ndarray:
    """Decode a stream made by `encode` (uint16 symbols); corrupt input is a ValueError.

    `max_symbols` bounds the count the header may claim before anything sized by it is
    allocated: a stream over one symbol spends no bits, so its bytes cannot bound it.
    Such a stream is filled at once (its lanes never move). Any other costs at most one
    step of the scalar loop per symbol (~1 µs), so its time is bounded by the elements
    it decodes to, which the caller bounds (the model, or the memory budget).
    """
    r = Reader(data, "rANS stream")
    tag = r.u8()
    if tag == TAG:
        precision, n, lanes = r.u8(), r.varint(), r.varint()
    elif tag in TAGS:
        precision, head = tag - TAGS[0] + 1, r.varint()
        n, lanes = head >> 1, r.varint() if head & 1 else 1
    else:
        raise ValueError(f"rANS stream tag {tag} is unknown; expected {TAG} or "
                         f"{TAGS[0]}..{TAGS[-1]}")
    if not 1 <= precision <= MAX_PRECISION or not 1 <= lanes <= MAX_LANES:
        raise ValueError(
            f"rANS stream header is corrupt (precision {precision}, 1..{MAX_PRECISION}; "
            f"lanes {lanes}, 1..{MAX_LANES})"
        )
    if max_symbols is not None and n > max_symbols:
        raise ValueError(f"rANS stream claims {n} symbols, at most {max_symbols} expected")
    size, top, width = r.varint(), r.varint(), r.u8()
    if not top < size <= MAX_SYMBOLS or width > MAX_PRECISION:
        raise ValueError(
            f"rANS frequency table of {size} symbols (top {top}), {width} bits each: corrupt"
        )
    rest = unpack_uints(r.take(packed_size(size - 1, width)), size - 1, width).astype(np.int64)
    total = 1 << precision
    freq = np.insert(rest, top, total - int(rest.sum()))
    if n == 0:
        r.finish()
        if lanes != 1:
            raise ValueError("empty rANS stream has lanes: corrupt")
        return np.zeros(0, dtype=np.uint16)
    if freq[top] < 1:
        raise ValueError(f"rANS frequencies add up to more than 2^{precision}: corrupt")
    if not min_lanes(n) <= lanes <= n:
        raise ValueError(
            f"rANS stream has {lanes} lanes for {n} symbols, at least {min_lanes(n)} needed: "
            "corrupt"
        )
    state = np.frombuffer(r.take(4 * lanes), dtype="<u4").astype(np.uint32)
    left = len(r.data) - r.pos
    if left % 2:
        raise ValueError("rANS payload is not a whole number of 16-bit words: corrupt")
    words = left // 2
    payload = np.frombuffer(r.take(left), dtype="<u2").astype(np.uint32)
    r.finish()
    if np.any(state < _LOW):
        raise ValueError("rANS final state below 2^16: corrupt stream")
    if freq[top] == total:  # one symbol: every step keeps the state and reads nothing
        if words or np.any(state != _LOW):
            raise ValueError("rANS stream of one symbol has a payload or moved states: corrupt")
        return np.full(n, top, dtype=np.uint16)
    # One table entry per slot: the symbol, its frequency and slot - cumulative frequency,
    # so a decoding step is two gathers, a multiply and an add.
    sym = np.repeat(np.arange(size, dtype=np.uint16), freq)
    cum = np.cumsum(freq) - freq
    # States stay below 2^32 at every step, so uint32 halves the memory traffic.
    slot_freq = np.repeat(freq, freq).astype(np.uint32)
    slot_bias = (np.arange(total, dtype=np.int64) - np.repeat(cum, freq)).astype(np.uint32)
    decoder = _decode_scalar if n <= SCALAR_LIMIT and lanes < _LOCKSTEP_LANES else (
        _decode_lockstep)
    out, pos, final = decoder(state, payload, n, precision, sym, slot_freq, slot_bias)
    if pos != words or np.any(final != _LOW):
        raise ValueError("rANS payload does not decode back to its initial states: corrupt")
    return out


def _decode_scalar(state, payload, n, precision, sym, slot_freq, slot_bias):
    """Decode a short stream one symbol at a time: (symbols, words read, final states)."""
    x = state.tolist()
    words = payload.tolist()
    sym_l, freq_l, bias_l = sym.tolist(), slot_freq.tolist(), slot_bias.tolist()
    lanes, mask, pos = len(x), (1 << precision) - 1, 0
    out = [0] * n
    for i in range(n):
        lane = i % lanes
        v = x[lane]
        slot = v & mask
        out[i] = sym_l[slot]
        v = freq_l[slot] * (v >> precision) + bias_l[slot]
        if v < _LOW:
            if pos == len(words):
                raise ValueError("rANS payload ends before its symbols do: corrupt stream")
            v = (v << 16) | words[pos]
            pos += 1
        x[lane] = v
    return np.array(out, dtype=np.uint16), pos, np.array(x)


def _decode_lockstep(state, payload, n, precision, sym, slot_freq, slot_bias):
    """Decode every lane at once, one symbol per lane per numpy step (long streams).

    Every array a step writes is preallocated (the symbols go straight into their row of
    the output), so a step is a handful of numpy calls and no allocation beyond the lanes
    that read a word. The table gathers use mode="clip" (a slot is below 2^precision, the
    tables' length): numpy buffers `out` under the default mode, which cost a third of
    the time.
    """
    lanes = state.size
    steps = -(-n // lanes)
    out = np.empty(steps * lanes, dtype=np.uint16)
    rows = out.reshape(steps, lanes)
    mask = np.uint32((1 << precision) - 1)
    p, low, sixteen = np.uint32(precision), np.uint32(_LOW), np.uint32(16)
    pos = 0
    last = n - (steps - 1) * lanes
    x = state
    slot = np.empty(lanes, dtype=np.uint32)
    tmp = np.empty(lanes, dtype=np.uint32)
    need = np.empty(lanes, dtype=bool)
    take_sym, take_freq, take_bias = sym.take, slot_freq.take, slot_bias.take
    for t in range(steps):
        if t == steps - 1 and last < lanes:
            x, slot, tmp, need = state[:last], slot[:last], tmp[:last], need[:last]
        np.bitwise_and(x, mask, out=slot)
        take_sym(slot, out=rows[t, : x.size], mode="clip")
        x >>= p
        take_freq(slot, out=tmp, mode="clip")
        x *= tmp
        take_bias(slot, out=tmp, mode="clip")
        x += tmp
        np.less(x, low, out=need)
        reads = need.nonzero()[0]
        if reads.size:
            end = pos + reads.size
            if end > payload.size:
                raise ValueError("rANS payload ends before its symbols do: corrupt stream")
            x[reads] = (x[reads] << sixteen) | payload[pos:end]
            pos = end
    return out[:n], pos, state


def coded_bits(symbols: np.ndarray) -> int:
    """Bits `encode` spends on `symbols`, headers, table and final states included."""
    return 8 * len(encode(symbols))
