"""The .pjz file format: `save` a pruned, weight-shared state_dict small; `load` it back exact.

Layout (little-endian):

    offset 0    4 B  magic b"PJZ\\x00"
           4    u16  format version (1)
           6    u16  flags (0, reserved)
           8    u64  manifest length M
          16    u32  CRC32 of the manifest
          20    M B  manifest: zlib-compressed UTF-8 JSON
                       {"format": "pjz", "data_bytes": D, "tensors": [...]}
        20+M    D B  every tensor's sections, in manifest order

Each manifest entry gives a tensor's name, dtype, shape, encoding and its sections as
[kind, length, crc32]. The manifest CRC covers all section CRCs, so a flipped byte anywhere
is caught. Loading never unpickles: it reads JSON, integers and raw little-endian bytes.
The manifest is compressed because on a small model its JSON is a few percent of the file.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.codec import packed
from penjing.codec.bitpack import Work
from penjing.codec.encoding import (
    ENCODINGS,
    PATTERN_DTYPES,
    SECTIONS,
    check_tensor,
    decode_tensor,
    decode_work,
    dtype_from_name,
    encode_tensor,
)
from penjing.codec.entropy import CODER_NAMES, check_coders
from penjing.codec.relindex import check_index_bits
from penjing.codec.report import CompressionReport, layer_report
from penjing.core import history, steps
from penjing.core.parametrize import finalize_
from penjing.errors import FormatError
from penjing.io import atomic_write_bytes, parse_json, remove_stale_temps

MAGIC = b"PJZ\x00"
FORMAT_VERSION = 1
# A manifest inflating beyond this is hostile or broken: ~180 B per tensor allows 500 k tensors.
MAX_MANIFEST_BYTES = 100 * 2**20
MAX_CODEBOOK = 65535  # codes 1..65535 plus 0 for "zero" are 16-bit Huffman symbols
MAX_NDIM = 32
MAX_NUMEL = 2**48  # elements of one tensor; bounds every product before it is formed
# Budget when the machine's memory cannot be read; otherwise half of physical memory.
FALLBACK_MEMORY = 8 * 2**30
SCRATCH_FIXED = 16 * 2**20  # decode tables and the pointer-jumping path of short streams
# Decode work that the elements decoded do not bound (big-integer steps of enumerative
# streams, the fixed cost of each coded section; penjing.codec.bitpack.Work units of
# ~0.1 µs) may cost a fixed allowance plus a share per byte of the file: a small file
# cannot buy minutes of CPU. Everything else costs at most ~1 µs per element decoded, and
# the elements are bounded by the memory budget (by the model, in penjing.load).
WORK_FIXED = 2**22
WORK_PER_BYTE = 32
_HEADER = struct.Struct("<4sHHQI")
_FIX = "re-create it with penjing.codec.save"


def _error(path: str | os.PathLike, problem: str, fix: str = _FIX) -> FormatError:
    return FormatError(f"{os.fspath(path)}: {problem}; {fix}")


def _state_dict(obj: object) -> dict:
    if isinstance(obj, nn.Module):
        if any(parametrize.is_parametrized(m) for m in obj.modules()):
            # live masks or shared weights: store what the layers compute, not the raw
            # originals and int64 codes, which no fresh model could load
            obj = copy.deepcopy(obj)
            finalize_(obj)
        return obj.state_dict()
    if not isinstance(obj, dict):
        raise TypeError(
            f"save expects an nn.Module or a dict[str, torch.Tensor], got {type(obj).__name__}; "
            "pass the model or model.state_dict()"
        )
    for name in obj:
        if not isinstance(name, str):
            raise TypeError(f"state_dict keys must be str, got {name!r} ({type(name).__name__})")
    return obj


def default_index_bits(tensor: torch.Tensor) -> int:
    """Gap width Deep Compression uses: 8 bits for conv weights (ndim >= 3), 5 for the rest."""
    return 8 if tensor.ndim >= 3 else 5


def _index_bits_map(index_bits: int | dict[str, int] | None, names: list[str]) -> dict:
    if index_bits is None:
        return {}
    if isinstance(index_bits, dict):
        unknown = sorted(set(index_bits) - set(names))
        if unknown:
            raise ValueError(
                f"index_bits names tensors that are not in the state_dict: {unknown[:5]}; "
                f"known tensors include {names[:5]}"
            )
        return {name: check_index_bits(b) for name, b in index_bits.items()}
    b = check_index_bits(index_bits)
    return dict.fromkeys(names, b)


def _build(
    obj: object,
    index_bits: int | dict[str, int] | None,
    max_codebook: int,
    coders: tuple[str, ...] = CODER_NAMES,
) -> tuple[list[bytes], list]:
    """Encode everything in memory: (file parts in order, per-tensor reports)."""
    state = _state_dict(obj)
    if isinstance(max_codebook, bool) or not isinstance(max_codebook, int):
        raise TypeError(f"max_codebook must be an int, got {type(max_codebook).__name__}")
    if not 0 <= max_codebook <= MAX_CODEBOOK:
        raise ValueError(f"max_codebook must be in 0..{MAX_CODEBOOK}, got {max_codebook}")
    bits = _index_bits_map(index_bits, list(state))
    coders = check_coders(coders)
    encoded = []
    for name, tensor in state.items():
        t = check_tensor(name, tensor)
        b = bits.get(name, default_index_bits(t))
        encoded.append(encode_tensor(name, t, b, max_codebook, coders))
    data = [section for e in encoded for _, section in e.sections]
    manifest = {"format": "pjz", "data_bytes": sum(map(len, data)),
                "tensors": [e.entry for e in encoded]}
    if isinstance(obj, nn.Module) and (recorded := structure(obj)):
        manifest["history"] = recorded  # penjing.load rebuilds the pruned structure from it
    manifest = zlib.compress(
        json.dumps(
            manifest,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8"),
        9,
    )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest), zlib.crc32(manifest))
    return [header, manifest, *data], [e.report for e in encoded]


def save(
    obj: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    index_bits: int | dict[str, int] | None = None,
    max_codebook: int = MAX_CODEBOOK,
    coders: tuple[str, ...] = CODER_NAMES,
) -> CompressionReport:
    """Write a model's state_dict as a .pjz file (atomically) and report what it cost.

    `index_bits` is the relative-index gap width: None for 8 (conv) / 5 (fc), one int for
    all tensors, or {name: bits}. Float tensors with at most `max_codebook` distinct
    non-zero values are codebook-coded; the rest are stored raw. Each coded stream takes
    the smallest of `coders` ("huffman", "rans", "fixed", "enumerative");
    `coders=("huffman",)` writes what the paper describes.

        report = penjing.codec.save(model, "lenet.pjz")
        print(report)
    """
    parts, layers = _build(obj, index_bits, max_codebook, coders)
    atomic_write_bytes(path, b"".join(parts))
    return CompressionReport.from_layers(layers, os.path.getsize(path))


def report_size(
    obj: nn.Module | dict[str, torch.Tensor],
    index_bits: int | dict[str, int] | None = None,
    *,
    max_codebook: int = MAX_CODEBOOK,
    coders: tuple[str, ...] = CODER_NAMES,
) -> CompressionReport:
    """What `save` would report, byte for byte, without writing a file."""
    parts, layers = _build(obj, index_bits, max_codebook, coders)
    return CompressionReport.from_layers(layers, sum(map(len, parts)))


def _read_header(head: bytes, path: str | os.PathLike, file_size: int) -> tuple[int, int]:
    """Check magic, version and flags; return (manifest length, manifest CRC)."""
    head = bytes(head)
    if file_size == 0:
        raise _error(path, "the file is empty, not a .pjz file")
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        raise _error(path, f"the file is truncated: {file_size} bytes, a partial header")
    if head[: len(MAGIC)] != MAGIC:
        raise _error(
            path,
            f"not a .pjz file: it starts with {head[:8]!r}, a .pjz starts with {MAGIC!r}",
            "pass a file written by penjing.codec.save",
        )
    if len(head) < _HEADER.size:
        raise _error(
            path,
            f"the file is truncated: {file_size} bytes, shorter than the "
            f"{_HEADER.size}-byte header",
        )
    _, version, flags, length, crc = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise _error(
            path,
            f".pjz format version {version} is unknown, this penjing reads "
            f"version {FORMAT_VERSION}",
            "upgrade penjing, or " + _FIX,
        )
    if flags != 0:
        raise _error(path, f"header flags are {flags:#06x}, expected 0: the header is corrupt")
    if length > file_size - _HEADER.size:
        raise _error(
            path,
            f"the file is truncated or its header corrupt: the manifest needs {length} bytes, only "
            f"{file_size - _HEADER.size} follow the header",
        )
    return length, crc


def _read_manifest(blob: bytes, crc: int, path: str | os.PathLike, data_size: int) -> dict:
    """Parse and check the manifest against the `data_size` bytes that follow it."""
    if zlib.crc32(blob) != crc:
        raise _error(path, "the manifest fails its CRC32 check: the file is corrupt")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(bytes(blob), MAX_MANIFEST_BYTES)
    except zlib.error as err:
        raise _error(path, f"the manifest does not decompress ({err})") from err
    if inflater.unconsumed_tail or not inflater.eof:
        raise _error(path, f"the manifest is cut short or over {MAX_MANIFEST_BYTES:,} bytes")
    try:
        manifest = parse_json(text, "the manifest")
    except ValueError as err:
        raise _error(path, str(err)) from err
    try:
        _check_manifest(manifest)
    except (ValueError, TypeError, KeyError) as err:
        raise _error(path, f"the manifest is malformed: {err}") from err
    expected = manifest["data_bytes"]
    if data_size < expected:
        raise _error(
            path,
            f"the file is truncated: {expected} bytes of tensor data expected, {data_size} present",
        )
    if data_size > expected:
        raise _error(path, f"the file has {data_size - expected} unexpected bytes after its end")
    return manifest


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _numel(shape: list[int]) -> int:
    """Elements of `shape`, refusing a product over MAX_NUMEL without forming it."""
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_NUMEL:
            raise ValueError(f"shape {shape[:MAX_NDIM]} has more than {MAX_NUMEL:,} elements")
    return numel


def _check_entry(entry: object, names: set) -> int:
    """Check one tensor entry against the limits of docs/format.md; return its bytes."""
    if not isinstance(entry, dict):
        raise ValueError(f"a tensor entry must be an object, got {type(entry).__name__}")
    name = entry["name"]
    if not isinstance(name, str) or name in names:
        raise ValueError(f"tensor name {name!r} is not a str or is repeated")
    names.add(name)
    dtype = dtype_from_name(entry["dtype"])
    shape, encoding = entry["shape"], entry["encoding"]
    if not (
        isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_count(d) for d in shape)
    ):
        raise ValueError(f"tensor {name!r} has shape {str(shape)[:200]} (at most {MAX_NDIM} "
                         "non-negative ints)")
    numel = _numel(shape)
    if encoding not in ENCODINGS:
        raise ValueError(f"tensor {name!r} has unknown encoding {str(encoding)[:50]!r}")
    sections = entry["sections"]
    kinds = [s[0] if isinstance(s, list) and s else None for s in sections] if isinstance(
        sections, list) else None
    if kinds != list(SECTIONS[encoding]) or not all(
        len(s) == 3 and _is_count(s[1]) and _is_count(s[2]) for s in sections
    ):
        raise ValueError(f"tensor {name!r} has sections {str(sections)[:200]}")
    size = dict((kind, length) for kind, length, _ in sections)
    nonzero = entry["nonzero"]
    if not _is_count(nonzero) or nonzero > numel:
        raise ValueError(f"tensor {name!r} has nonzero count {nonzero!r} for {numel} elements")
    if encoding == "raw":
        if size["raw"] != numel * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: raw section of {size['raw']} bytes, shape "
                             f"{shape} of {dtype} needs {numel * dtype.itemsize}")
        return sum(size.values())
    if dtype not in PATTERN_DTYPES:
        raise ValueError(f"tensor {name!r}: encoding {encoding!r} needs a float16/bfloat16/"
                         f"float32/float64 tensor, the manifest says {dtype}")
    if encoding == "packed":
        if size != packed.expected_sizes(entry, shape, dtype.itemsize):
            raise ValueError(f"tensor {name!r}: packed sections of {size} bytes do not fit "
                             f"{entry.get('levels')!r} levels over shape {shape}")
        return sum(size.values())
    book = entry["codebook"]
    if not _is_count(book) or book > MAX_CODEBOOK or size["codebook"] != book * dtype.itemsize:
        raise ValueError(f"tensor {name!r} has a codebook of {book!r} entries in "
                         f"{size['codebook']} bytes (at most {MAX_CODEBOOK})")
    # No symbols-per-byte bound here: rANS spends less than a bit on a likely symbol (none
    # at all on a stream of one symbol). Each decoder refuses a count over `numel` before
    # allocating, and the memory budget bounds `numel`.
    if encoding == "sparse":
        check_index_bits(entry["index_bits"])
        entries, padding = entry["entries"], entry["padding"]
        if not (_is_count(entries) and _is_count(padding)) or entries != nonzero + padding:
            raise ValueError(f"tensor {name!r}: {entries!r} entries are not {nonzero} non-zeros "
                             f"plus {padding!r} padding")
        if entries > numel:
            raise ValueError(f"tensor {name!r}: {entries} entries cannot fit in {numel} "
                             "elements")
    return sum(size.values())


def _check_manifest(manifest: object) -> None:
    """Raise ValueError unless the manifest has the shape `_build` writes, within limits."""
    if not isinstance(manifest, dict) or manifest.get("format") != "pjz":
        raise ValueError("it is not a pjz manifest")
    tensors, total = manifest.get("tensors"), manifest.get("data_bytes")
    if not isinstance(tensors, list) or not _is_count(total):
        raise ValueError("'tensors' must be a list and 'data_bytes' a count")
    names: set = set()
    summed = sum(_check_entry(entry, names) for entry in tensors)
    if summed != total:
        raise ValueError(f"sections add up to {summed} bytes, 'data_bytes' says {total}")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_max_memory() -> int:
    """The memory budget `load` uses by default: half of physical memory (8 GiB if unknown)."""
    memory = _physical_memory()
    return memory // 2 if memory else FALLBACK_MEMORY


def _scratch(entry: dict) -> int:
    """Bytes of temporaries decoding `entry` needs on top of its result (docs/format.md)."""
    sizes = {kind: length for kind, length, _ in entry["sections"]}
    if entry["encoding"] == "dense":
        return 4 * math.prod(entry["shape"]) + 16 * sizes["codes"] + SCRATCH_FIXED
    if entry["encoding"] == "packed":
        return 16 * math.prod(entry["shape"]) + SCRATCH_FIXED
    if entry["encoding"] == "sparse":
        return 32 * entry["entries"] + 16 * (sizes["gaps"] + sizes["values"]) + SCRATCH_FIXED
    return 0


def peak_memory(manifest: dict, file_size: int) -> int:
    """Estimated peak bytes of loading a checked manifest: the file, every decoded tensor,
    and the temporaries of the most demanding one."""
    decoded = sum(
        math.prod(e["shape"]) * dtype_from_name(e["dtype"]).itemsize for e in manifest["tensors"]
    )
    return file_size + decoded + max(map(_scratch, manifest["tensors"]), default=0)


def _check_budget(manifest: dict, path: str | os.PathLike, file_size: int, budget: int) -> None:
    """Refuse a file whose decoding would not fit the memory budget, before allocating.

    Sparse tensors end in zeros that cost no bytes, so a small file may rightly stand for
    a large state_dict; one beyond the budget is damaged or hostile (or needs a larger
    `max_memory`), and allocating it would kill the process instead of raising.
    """
    peak = peak_memory(manifest, file_size)
    if peak > budget:
        raise _error(
            path,
            f"loading it would take about {peak:,} bytes of memory, more than the budget of "
            f"{budget:,} bytes: its shapes are corrupt, or pass a larger max_memory",
            "pass max_memory=... to penjing.codec.load if the model is really this large, "
            "else " + _FIX,
        )


def _budget(max_memory: int | None) -> int:
    if max_memory is None:
        return default_max_memory()
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return max_memory


def _read_file(path: str | os.PathLike) -> bytes:
    """The file's bytes; a folder or unreadable file is an OSError naming it."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{os.fspath(path)!r} is a folder, not a .pjz file")
    data = p.read_bytes()
    remove_stale_temps(p)
    return data


def load(path: str | os.PathLike, *, max_memory: int | None = None) -> dict[str, torch.Tensor]:
    """Read a .pjz file back into a state_dict, bit-exact; any damage is a FormatError.

    Every count and shape is checked against the file's bytes, and the estimated peak
    memory against `max_memory` bytes (default: half of physical memory), before anything
    is allocated; every section's CRC32 is checked before it is decoded, and nothing
    partial is returned. A missing file is FileNotFoundError.
    """
    return load_with_history(path, max_memory=max_memory)[0]


def work_budget(file_size: int) -> Work:
    """The decode-work budget of a file of `file_size` bytes (WORK_FIXED + per byte)."""
    return Work(WORK_FIXED + WORK_PER_BYTE * file_size,
                f"{WORK_FIXED:,} + {WORK_PER_BYTE} per byte of its {file_size:,}")


def load_with_history(
    path: str | os.PathLike,
    *,
    max_memory: int | None = None,
    check: Callable[[dict[str, tuple[torch.dtype, tuple[int, ...]]], list], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list]:
    """`load`, plus the structural history the file records (empty when it has none;
    see penjing.core.history), from one read of the file.

    `check({name: (dtype, shape)}, history)` runs once the manifest is read and checked,
    before anything is decoded: penjing.load refuses there a file whose tensors do not
    fit the model, so a small file cannot make it decode gigabytes it will not use.
    """
    budget = _budget(max_memory)
    data = memoryview(_read_file(path))
    head = data[: _HEADER.size]
    length, crc = _read_header(head, path, len(data))
    start = _HEADER.size + length
    manifest = _read_manifest(data[_HEADER.size : start], crc, path, len(data) - start)
    _check_budget(manifest, path, len(data), budget)
    # Check every CRC before decoding anything: damage is reported fast and nothing is
    # decoded from bytes that are not what `save` wrote.
    offset, pending = start, []
    for entry in manifest["tensors"]:
        sections = {}
        for kind, size, section_crc in entry["sections"]:
            chunk = data[offset : offset + size]
            if zlib.crc32(chunk) != section_crc:
                raise _error(
                    path,
                    f"section {kind!r} of tensor {entry['name']!r} (bytes "
                    f"{offset}..{offset + size}) fails its CRC32 check: the file "
                    "is corrupt",
                )
            sections[kind] = chunk
            offset += size
        pending.append((entry, sections))
    history = manifest.get("history", [])
    if not isinstance(history, list):
        raise _error(path, "its history is not a list")
    if check is not None:
        check({e["name"]: (dtype_from_name(e["dtype"]), tuple(e["shape"]))
               for e in manifest["tensors"]}, history)
    work = work_budget(len(data))
    for entry, sections in pending:  # the whole budget, before anything is decoded
        try:
            work.spend(decode_work(entry, sections), f"tensor {entry['name']!r}")
        except ValueError as err:
            raise _error(path, str(err)) from None
    state: dict[str, torch.Tensor] = {}
    for entry, sections in pending:
        try:
            state[entry["name"]] = decode_tensor(entry, sections)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as err:
            raise _error(path, f"tensor {entry['name']!r} cannot be decoded: {err}") from err
        except MemoryError as err:  # the budget is an estimate; the allocator has the last word
            raise _error(
                path, f"tensor {entry['name']!r} does not fit in memory once decoded",
                "free memory, or check that the file is the model you meant",
            ) from err
    return state, history


def structure(model: nn.Module) -> list[dict]:
    """The steps of `model`'s history that change its structure (see penjing.core.history);
    masks and shared weights are baked into a .pjz, so their steps are left out."""
    return [s for s in history.steps(model) if steps.get(s["op"]).structural]


def _check_sections(f, manifest: dict, path: str | os.PathLike, offset: int) -> None:
    """Every section's CRC32, read from `f` a bounded chunk at a time."""
    for entry in manifest["tensors"]:
        for kind, size, section_crc in entry["sections"]:
            crc, left = 0, size
            while left:
                chunk = f.read(min(left, 1 << 22))
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            if crc != section_crc:
                raise _error(path, f"section {kind!r} of tensor {entry['name']!r} (bytes "
                                   f"{offset}..{offset + size}) fails its CRC32 check: the "
                                   "file is corrupt")
            offset += size


def inspect(path: str | os.PathLike, *, verify: bool = True) -> CompressionReport:
    """Per-tensor sizes and encodings, read from the header and manifest without decoding.

    With `verify` (the default) every section's CRC32 is checked too, so a damaged file
    is a FormatError here as in `load` (the whole file is read once, 4 MiB at a time);
    entropies are None.
    """
    if Path(path).is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{os.fspath(path)!r} is a folder, not a .pjz file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length, crc = _read_header(f.read(_HEADER.size), path, size)
        manifest = _read_manifest(f.read(length), crc, path, size - _HEADER.size - length)
        if verify:
            _check_sections(f, manifest, path, _HEADER.size + length)
    layers = [
        layer_report(entry, dtype_from_name(entry["dtype"]).itemsize)
        for entry in manifest["tensors"]
    ]
    return CompressionReport.from_layers(layers, size)
