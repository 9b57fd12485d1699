"""How one tensor becomes byte sections of a .pjz file, and back, bit-exactly.

A float tensor with few distinct values (pruned, then weight-shared) is stored as a
codebook of its distinct non-zero values plus a code per element (0 = zero weight), and
the codes either densely (entropy-coded over every position) or sparsely (relative-index
gaps and values). Each stream is Huffman- or rANS-coded, whichever is smaller, and
whichever of dense, sparse and raw bytes is smallest wins.
Everything else (integer buffers, bool masks, dense biases) is stored raw, little-endian.

Coded tensors round-trip bit-exactly except for the sign of zero: -0.0 (what `w * mask`
leaves for a pruned negative weight) is a zero like +0.0 and loads as +0.0, otherwise
every pruned weight would cost an entry. NaN payloads and all other values are kept.
"""

from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from penjing.codec import entropy, huffman, packed, relindex
from penjing.codec.report import LayerReport, layer_report

ENCODINGS = ("raw", "dense", "sparse", "packed")
SECTION_UNITS = 10_000  # decode work (penjing.codec.bitpack.Work) of one coded section
SECTIONS = {
    "raw": ("raw",),
    "dense": ("codebook", "codes"),
    "sparse": ("codebook", "gaps", "values"),
    "packed": packed.SECTIONS,  # binary / ternary rows: a scale per row, 1 or 2 bits each
}

# Codebooks hold bit patterns, not values, so NaN payloads come back bit-exact.
_PATTERN = {
    torch.float16: (torch.int16, "<i2"),
    torch.bfloat16: (torch.int16, "<i2"),
    torch.float32: (torch.int32, "<i4"),
    torch.float64: (torch.int64, "<i8"),
}


PATTERN_DTYPES = frozenset(_PATTERN)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype a manifest names; anything else (e.g. 'load', or a quantized dtype
    `save` never writes) is a ValueError."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or name.startswith(("q", "bits")):
        raise ValueError(f"unknown dtype {str(name)[:50]!r}")
    return dtype


@dataclass
class EncodedTensor:
    """A tensor ready to write: its manifest entry, its sections in order, and its row."""

    entry: dict
    sections: list[tuple[str, bytes]]
    report: LayerReport


def check_tensor(name: str, tensor: object) -> torch.Tensor:
    """A detached, contiguous CPU copy of a storable tensor, or a TypeError saying why not."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"state_dict entry {name!r} must be a torch.Tensor, got {type(tensor).__name__}; "
            "store only tensors (convert Python numbers with torch.tensor)"
        )
    if tensor.layout != torch.strided:
        raise TypeError(f"tensor {name!r} has layout {tensor.layout}; call .to_dense() first")
    if tensor.is_quantized:
        raise TypeError(f"tensor {name!r} is a quantized tensor; call .dequantize() first")
    if tensor.device.type == "meta":
        raise TypeError(f"tensor {name!r} is on the meta device and holds no data")
    return tensor.detach().cpu().contiguous()


def _raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return b""
    data = flat.view(torch.uint8).numpy()
    if sys.byteorder == "big" and t.element_size() > 1:
        data = data.reshape(-1, t.element_size())[:, ::-1]
    return data.tobytes()


def _from_raw(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    if len(data) != numel * dtype.itemsize:
        raise ValueError(
            f"raw section has {len(data)} bytes, shape {shape} needs {numel * dtype.itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    if sys.byteorder == "big" and dtype.itemsize > 1:
        arr = np.ascontiguousarray(arr.reshape(-1, dtype.itemsize)[:, ::-1]).reshape(-1)
    return torch.from_numpy(arr).view(dtype).reshape(shape)


def _zero_patterns(patterns: np.ndarray) -> np.ndarray:
    """Which float bit patterns are +0.0 or -0.0 (only the sign bit set)."""
    return (patterns == 0) | (patterns == np.iinfo(patterns.dtype).min)


def _count_nonzero(t: torch.Tensor, raw: bytes) -> int:
    """Elements that are not zero: the entries a sparse format has to store."""
    if t.numel() == 0:
        return 0
    if t.dtype in _PATTERN:
        patterns = t.reshape(-1).view(_PATTERN[t.dtype][0]).numpy()
        return int(t.numel() - np.count_nonzero(_zero_patterns(patterns)))
    return int(np.frombuffer(raw, dtype=np.uint8).reshape(t.numel(), -1).any(axis=1).sum())


def _pattern_values(patterns: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The float values of bit patterns, only to sort the codebook by value."""
    if dtype == torch.bfloat16:
        return (patterns.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return patterns.view(
        {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype]
    )


def _codebook(t: torch.Tensor, max_codebook: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(codebook bit patterns sorted by value, uint16 codes with 0 = zero) or None if too many."""
    pattern, _ = _PATTERN[t.dtype]
    bits = t.reshape(-1).view(pattern).numpy()
    # A dense float tensor has millions of distinct values; a strided sample shows that
    # without sorting all of it (a sample never has more distinct values than the whole).
    step = max(1, bits.size // (1 << 18))
    if step > 1 and np.unique(bits[::step]).size > max_codebook + 2:
        return None
    uniq = np.unique(bits)
    nonzero = np.flatnonzero(~_zero_patterns(uniq))
    if nonzero.size > max_codebook:
        return None
    # Searching the few distinct values beats np.unique's return_inverse (a full argsort).
    inverse = np.searchsorted(uniq, bits)
    order = np.argsort(_pattern_values(uniq[nonzero], t.dtype), kind="stable")
    code_of = np.zeros(uniq.size, dtype=np.uint16)
    code_of[nonzero[order]] = np.arange(1, nonzero.size + 1)
    return uniq[nonzero][order], code_of[inverse]


class _Choice(NamedTuple):
    """One way to store a tensor: its sections, manifest fields and stream entropies."""

    sections: list[tuple[str, bytes]]
    fields: dict
    index_entropy: float | None = None
    weight_entropy: float | None = None

    @property
    def size(self) -> int:
        """Bytes in the file: the sections, and what the (zlib-compressed) manifest spends
        on each section's length and CRC and on each field of the entry, roughly."""
        sections = sum(len(data) for _, data in self.sections)
        return sections + _MANIFEST_SECTION * len(self.sections) + _MANIFEST_FIELD * len(
            self.fields)


# A section's entry in the compressed manifest is mostly its CRC (4 incompressible
# bytes) and length; a field, a repeated key and a small number. Without these, a sparse
# form three bytes smaller than the dense one won, and the file grew by its extra entry.
_MANIFEST_SECTION = 6
_MANIFEST_FIELD = 3


def _coded_choices(
    patterns: np.ndarray,
    codes: np.ndarray,
    dtype: torch.dtype,
    index_bits: int,
    coders: tuple[str, ...],
) -> list[_Choice]:
    """The dense and the sparse way to store a codebook and its codes."""
    book = ("codebook", patterns.astype(_PATTERN[dtype][1]).tobytes())

    def code(symbols: np.ndarray) -> bytes:
        return entropy.encode(symbols, coders=coders)

    fields = {"codebook": int(patterns.size)}
    dense = _Choice(
        [book, ("codes", code(codes))],
        {"encoding": "dense", **fields},
        weight_entropy=huffman.entropy_bits(codes),
    )
    gaps, values = relindex.encode(codes, index_bits)
    sparse = _Choice(
        [book, ("gaps", code(gaps)), ("values", code(values))],
        {
            "encoding": "sparse",
            **fields,
            "index_bits": index_bits,
            "entries": int(gaps.size),
            "padding": int(gaps.size - np.count_nonzero(codes)),
        },
        index_entropy=huffman.entropy_bits(gaps),
        weight_entropy=huffman.entropy_bits(values),
    )
    return [dense, sparse]


def encode_tensor(
    name: str,
    tensor: torch.Tensor,
    index_bits: int,
    max_codebook: int,
    coders: tuple[str, ...] = entropy.CODER_NAMES,
) -> EncodedTensor:
    """Encode one tensor in the smallest of raw, dense and sparse form (raw wins ties),
    each stream with the smallest of `coders`."""
    t = check_tensor(name, tensor)
    raw = _raw_bytes(t)
    choices = [_Choice([("raw", raw)], {"encoding": "raw"})]
    book = _codebook(t, max_codebook) if t.dtype in _PATTERN and t.numel() else None
    if book is not None:
        choices += _coded_choices(*book, t.dtype, index_bits, coders)
    if t.dtype in _PATTERN:
        split = packed.split(t, t.reshape(-1).view(_PATTERN[t.dtype][0]).numpy())
        if split is not None:
            choices.append(_Choice(*packed.encode(*split, _PATTERN[t.dtype][1])))
    best = min(choices, key=lambda c: c.size)
    entry = {
        "name": name,
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        **best.fields,
        "nonzero": _count_nonzero(t, raw),
        "sections": [[kind, len(data), zlib.crc32(data)] for kind, data in best.sections],
    }
    report = layer_report(
        entry,
        t.element_size(),
        index_entropy=best.index_entropy,
        weight_entropy=best.weight_entropy,
    )
    return EncodedTensor(entry, best.sections, report)


def decode_work(entry: dict, sections: dict[str, memoryview]) -> int:
    """The decode work (penjing.codec.bitpack.Work units) of one checked tensor entry: the
    fixed cost of each section of a coded tensor (stream headers, code tables, a dozen
    numpy calls: ~0.5 ms), so thousands of tiny coded tensors are bounded by their bytes,
    plus what its streams' headers say they need (`entropy.work`)."""
    if entry["encoding"] in ("raw", "packed"):
        return 0 if entry["encoding"] == "raw" else SECTION_UNITS * len(sections)
    streams = [v for k, v in sections.items() if k != "codebook"]
    return SECTION_UNITS * len(sections) + sum(entropy.work(s) for s in streams)


def decode_tensor(entry: dict, sections: dict[str, memoryview],
                  work: entropy.Work | None = None) -> torch.Tensor:
    """Rebuild a tensor from its manifest entry and section bytes; corrupt input, or a
    stream that would exceed the `work` budget, is a ValueError."""
    dtype = dtype_from_name(entry["dtype"])
    shape = tuple(entry["shape"])
    numel = math.prod(shape)
    encoding = entry["encoding"]
    if encoding == "raw":
        return _from_raw(sections["raw"], dtype, shape)
    if dtype not in _PATTERN:
        raise ValueError(
            f"encoding {encoding!r} needs a float16/bfloat16/float32/float64 "
            f"tensor, the manifest says {dtype}"
        )
    _, little = _PATTERN[dtype]
    if encoding == "packed":
        patterns = packed.decode(entry, sections, shape, little)
        return torch.from_numpy(patterns).view(dtype).reshape(shape)
    size = entry["codebook"]
    cb_bytes = sections["codebook"]
    if not isinstance(size, int) or len(cb_bytes) != size * np.dtype(little).itemsize:
        raise ValueError(f"codebook section has {len(cb_bytes)} bytes for {size!r} entries")
    table = np.zeros(size + 1, dtype=np.dtype(little).newbyteorder("="))
    table[1:] = np.frombuffer(cb_bytes, dtype=little)
    if encoding == "dense":
        codes = entropy.decode(sections["codes"], max_symbols=numel, work=work)
        if codes.size != numel:
            raise ValueError(f"code stream has {codes.size} codes for {numel} elements")
        _check_codes(codes, size)
        out = table[codes]
    else:
        gaps = entropy.decode(sections["gaps"], max_symbols=numel, work=work)
        values = entropy.decode(sections["values"], max_symbols=numel, work=work)
        if gaps.size != values.size:
            raise ValueError(
                f"gaps and values must pair up, got {gaps.size} gaps and {values.size} values"
            )
        _check_codes(values, size)
        where = relindex.positions(gaps, numel, entry["index_bits"])
        del gaps
        # Zero-filled by the allocator and written only where entries are: the trailing
        # zeros of a sparse tensor cost no time and no resident memory.
        out = np.zeros(numel, dtype=table.dtype)
        out[where] = table[values]
    return torch.from_numpy(out).view(dtype).reshape(shape)


def _check_codes(codes: np.ndarray, size: int) -> None:
    if codes.size and int(codes.max()) > size:
        raise ValueError(f"code {int(codes.max())} points past a codebook of {size} entries")
