"""Structure-aware fuzzing of every penjing loader.

Byte flips only test the checksums. Here each input is a valid file (a .pjz, a plain,
pruned or quantized safetensors checkpoint, a `pj.save` model file, a recipe) edited where
it means something — manifest fields, shapes, counts, Huffman and rANS headers and chunk
sizes, one-symbol streams and thousand-fold tensor lists, change lists, histories,
quantization configs, hash keys, tensors, YAML aliases and values — with its checksums
and hashes recomputed (mostly), so the edit reaches the parser behind them. Every input
runs in-process under a watchdog; a loader passes when it returns or raises a
`penjing.errors.PenjingError`, in under `SLOW_S` seconds plus a share per byte of the
file and per byte it decoded, with its peak resident memory under `MEMORY_FACTOR` x what
it decoded plus `MEMORY_FIXED`. A model file that loads although its hash was not
recomputed, or although only its metadata (history, config) was edited, must compute
what its seed computes: a forged file must not load silently.

Used by tests/fuzz/test_fuzz.py (a bounded share in `make test`) and bench/fuzz.py
(`make fuzz`, 100,000 inputs).
"""

from __future__ import annotations

import collections
import copy
import json
import math
import resource
import signal
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

import penjing as pj
from penjing.codec import container, rans
from penjing.codec.bitpack import Reader, varint
from penjing.core.checkpoint import INTEGRITY_KEY, checkpoint_digest
from penjing.core.model_file import PRUNED_KEY
from penjing.errors import PenjingError
from penjing.prune.structural.surgery import Change
from penjing.quant import ptq, save_quantized
from penjing.quant.linear.checkpoint import load_quantized
from penjing.quant.linear.config import make_config

# An input fails when it takes longer than SLOW_S, plus SLOW_PER_FILE_BYTE_S per byte of
# the file (Huffman decodes ~1 µs per byte), plus SLOW_PER_BYTE_S per byte it decoded
# (a one-lane rANS stream costs ~1 µs per element, 0.25 µs per float32 byte): the bound
# docs/format.md states.
SLOW_S = 2.0
SLOW_PER_FILE_BYTE_S = 2e-6
SLOW_PER_BYTE_S = 0.25e-6
WATCHDOG_S = 10.0  # an input still running then is stopped and counted
MEMORY_FACTOR = 4
MEMORY_FIXED = 64 * 2**20
MAX_MEMORY = 2**30  # the .pjz budget under fuzzing: a file may claim up to this, no more
KINDS = ("pjz", "checkpoint", "pruned", "quantized", "model", "pjz_model", "inspect",
         "recipe")

INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 17, 24, 25, 255, 256, 4095, 4096, 4097, 65535,
               65536, 2**20, 2**31 - 1, 2**31, 2**32, 2**40, 2**48, 2**48 + 1, 2**62,
               2**63 - 1, -1, -2, -(2**63), True, False, None, "x", "", 1.5, -0.0, [], {},
               [1, 2], {"a": 1}]


class Timeout(BaseException):
    """Raised by the watchdog; a BaseException so no loader's except clause swallows it."""


def _build_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


_MLP = _build_mlp()


def mlp() -> nn.Module:
    """A fresh copy of the small model every checkpoint seed is saved from and loaded into."""
    return copy.deepcopy(_MLP)


# ---- seeds ---------------------------------------------------------------------------


def _shared(shape: tuple[int, ...], values: int, sparsity: float, g: torch.Generator,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    book = torch.linspace(0.1, 1.0, values)
    w = book[torch.randint(0, values, shape, generator=g)]
    return (w * (torch.rand(shape, generator=g) >= sparsity)).to(dtype)


def pjz_seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    states = [
        {"fc.weight": _shared((40, 30), 15, 0.9, g), "fc.bias": torch.randn(40, generator=g),
         "bn.num_batches_tracked": torch.tensor(7)},
        {"half": _shared((20, 20), 3, 0.3, g, torch.float16),
         "bf16": _shared((16, 9), 5, 0.6, g, torch.bfloat16),
         "f64": _shared((5, 5), 2, 0.5, g, torch.float64)},
        {"zeros": torch.zeros(50, 50), "empty": torch.zeros(0, 5),
         "mask": torch.rand(6, 7, generator=g) > 0.5, "i8": torch.arange(-5, 5).to(torch.int8)},
        {"conv": _shared((16, 8, 3, 3), 31, 0.7, g)},
        {"long": _shared((200, 200), 16, 0.5, g)},  # long streams: the lockstep decoder
    ]
    seeds = []
    # Each state twice: streams the smaller of Huffman and rANS (as `save` writes), and
    # Huffman only, so both decoders meet every kind of stream.
    for coders in (("huffman", "rans"), ("huffman",)):
        for state in states:
            parts, _ = container._build(state, None, container.MAX_CODEBOOK, coders)
            seeds.append(b"".join(parts))
    return seeds


def _read_safetensors(data: bytes) -> tuple[dict, dict]:
    from safetensors.torch import load

    tensors = load(data)
    header_len = struct.unpack_from("<Q", data)[0]
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    return tensors, metadata


def checkpoint_seeds(folder: Path) -> dict[str, list[tuple[dict, dict]]]:
    """(tensors, metadata) of valid plain, pruned and quantized checkpoints of `mlp`."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, list[tuple[dict, dict]]] = {}
    plain = folder / "plain.safetensors"
    pj.train.save_checkpoint(mlp(), plain)
    seeds["checkpoint"] = [_read_safetensors(plain.read_bytes())]
    model = mlp()
    changes = [Change("0", "weight", 0, (0, 2, 3, 5)), Change("0", "bias", 0, (0, 2, 3, 5)),
               Change("1", "weight", 0, (0, 2, 3, 5)), Change("1", "bias", 0, (0, 2, 3, 5)),
               Change("1", "running_mean", 0, (0, 2, 3, 5)),
               Change("1", "running_var", 0, (0, 2, 3, 5)),
               Change("3", "weight", 1, (0, 2, 3, 5))]
    pj.prune.apply_(model, changes)
    pruned = folder / "pruned.safetensors"
    pj.prune.save_pruned(model, changes, pruned)
    seeds["pruned"] = [_read_safetensors(pruned.read_bytes())]
    seeds["quantized"] = []
    calib = [torch.randn(16, 8, generator=torch.Generator().manual_seed(1))]
    for config in (make_config(bits=8, granularity="channel", act_bits=8),
                   make_config(bits=4, granularity="tensor", act_bits=None),
                   make_config(bits=4, granularity="group", group_size=4, act_bits=None)):
        q = ptq(mlp().eval(), calib, config)
        path = folder / "q.safetensors"
        save_quantized(q, config, path)
        seeds["quantized"].append(_read_safetensors(path.read_bytes()))
    return seeds


# ---- .pjz mutations ------------------------------------------------------------------


@dataclass
class _Pjz:
    manifest: dict
    sections: list[list[bytes]]  # per tensor, per section

    @classmethod
    def parse(cls, data: bytes) -> _Pjz:
        (length,) = struct.unpack_from("<Q", data, 8)
        manifest = json.loads(zlib.decompress(data[20 : 20 + length]))
        offset, sections = 20 + length, []
        for entry in manifest["tensors"]:
            own = []
            for _, size, _ in entry["sections"]:
                own.append(data[offset : offset + size])
                offset += size
            sections.append(own)
        return cls(manifest, sections)

    def fix(self) -> None:
        """Make section lengths, CRCs and data_bytes agree with the bytes again."""
        total = 0
        for entry, own in zip(self.manifest.get("tensors", []), self.sections, strict=False):
            if not isinstance(entry, dict) or not isinstance(entry.get("sections"), list):
                continue
            for s, blob in zip(entry["sections"], own, strict=False):
                if isinstance(s, list) and len(s) == 3:
                    s[1], s[2] = len(blob), zlib.crc32(blob)
            total += sum(map(len, own))
        self.manifest["data_bytes"] = total

    def pack(self, text: str | None = None, version: int = 1, flags: int = 0) -> bytes:
        text = json.dumps(self.manifest) if text is None else text
        blob = zlib.compress(text.encode("utf-8", "surrogatepass"))
        head = struct.pack("<4sHHQI", b"PJZ\x00", version, flags, len(blob), zlib.crc32(blob))
        return head + blob + b"".join(b for own in self.sections for b in own)


def _near(rng: np.random.Generator, value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return int(rng.choice([value + 1, value - 1, value * 2, value // 2, value * 1000,
                               value * 2**20, -value]))
    return INTERESTING[rng.integers(len(INTERESTING))]


def _huffman_fields(blob: bytes) -> list[int] | None:
    try:
        r = Reader(blob, "stream")
        fields = [r.u8(), r.u8(), r.u8(), r.u8(), r.varint(), r.varint(), r.varint()]
        return fields + [r.pos]
    except ValueError:
        return None


def _edit_huffman(rng: np.random.Generator, blob: bytes) -> bytes:
    fields = _huffman_fields(blob)
    if fields is None:
        return blob
    *values, end = fields
    i = int(rng.integers(7))
    n = values[4]
    choices = [0, 1, 2, 5, 6, 24, 25, 255] if i < 4 else [
        0, 1, n, n + 1, n - 1, 2 * n, 4096, 4097, 65536, 2**40, 2**63, 8 * len(blob)]
    new = int(choices[rng.integers(len(choices))])
    values[i] = max(new, 0) if i >= 4 else new % 256
    head = bytes(values[:4]) + b"".join(varint(v) for v in values[4:])
    return head + blob[end:]


def _rans_fields(blob: bytes) -> list[int] | None:
    """tag, precision, n, lanes, alphabet size, top symbol, width, then the header's end."""
    try:
        r = Reader(blob, "stream")
        if r.u8() != rans.TAG:
            return None
        fields = [rans.TAG, r.u8(), r.varint(), r.varint(), r.varint(), r.varint(), r.u8()]
        return fields + [r.pos]
    except ValueError:
        return None


def _edit_rans(rng: np.random.Generator, blob: bytes) -> bytes:
    fields = _rans_fields(blob)
    if fields is None:
        return blob
    *values, end = fields
    i = int(rng.integers(7))
    n = values[2]
    choices = {
        0: [1, 2, 3, 255],
        1: [0, 1, 15, 16, 17, 255],
        6: [0, 1, 15, 16, 17, 255],
    }.get(i, [0, 1, n, n + 1, n - 1, 2 * n, 8192, 8193, 2**16, 2**18 + 1, 2**40, 2**63])
    values[i] = max(int(choices[rng.integers(len(choices))]), 0)
    if i in (0, 1, 6):
        values[i] %= 256
    head = bytes(values[:2]) + b"".join(varint(v) for v in values[2:6]) + bytes([values[6]])
    return head + blob[end:]


def _edit_bytes(rng: np.random.Generator, blob: bytes) -> bytes:
    op = rng.integers(4)
    data = bytearray(blob)
    if op == 0 and data:
        for _ in range(int(rng.integers(1, 4))):
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    elif op == 1:
        data = data[: int(rng.integers(len(data) + 1))]
    elif op == 2:
        data += bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    elif data:
        data[rng.integers(len(data))] = int(rng.integers(256))
    return bytes(data)


def _raw_text(rng: np.random.Generator, text: str) -> str:
    op = rng.integers(5)
    if op == 0:  # a huge integer where a number was
        digits = int(rng.choice([20, 400, 5000]))
        return text.replace(":", ":1" + "0" * digits + ",\"_\":", 1)
    if op == 1:  # deep nesting
        depth = int(rng.choice([17, 100, 5000, 100000]))
        return text.replace('"shape":', '"shape":' + "[" * depth + "]" * depth + ",\"s\":", 1)
    if op == 2:
        return text.replace("1", "NaN", 1)
    if op == 3:
        return text[: int(rng.integers(len(text) + 1))]
    return text.replace("[", "[[", 1)


def _mutate_pjz_fields(rng: np.random.Generator, seed: bytes) -> bytes:
    f = _Pjz.parse(seed)
    tensors = f.manifest["tensors"]
    text = None
    version = flags = None
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(100)
        t = int(rng.integers(len(tensors))) if tensors else None
        entry = tensors[t] if t is not None and isinstance(tensors[t], dict) else None
        if op < 25 and entry is not None:  # a field of an entry
            key = str(rng.choice(["shape", "nonzero", "entries", "padding", "codebook",
                                  "index_bits", "encoding", "dtype", "name", "sections"]))
            if key == "encoding":
                entry[key] = str(rng.choice(["raw", "dense", "sparse", "zip"]))
            elif key == "dtype":
                entry[key] = str(rng.choice(["float32", "float16", "bfloat16", "float64",
                                             "int64", "bool", "qint8", "complex64", "load"]))
            elif rng.random() < 0.1:
                entry.pop(key, None)
            else:
                entry[key] = _near(rng, entry.get(key, 0))
        elif op < 45 and entry is not None:  # the shape
            shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else [1]
            how = rng.integers(5)
            if how == 0 and shape:
                i = int(rng.integers(len(shape)))
                shape[i] = _near(rng, shape[i])
            elif how == 1:
                shape.append(int(rng.choice([1, 2, 1000, 2**20, 2**31])))
            elif how == 2 and shape:
                shape.pop()
            elif how == 3:
                shape = [int(rng.choice([2**10, 2**14, 2**16, 2**24]))] * int(rng.integers(1, 4))
            else:
                shape = shape[::-1] + [1] * int(rng.integers(0, 40))
            entry["shape"] = shape
        elif op < 65 and t is not None:  # a stream's header: counts, chunk, lanes, widths
            coded = [i for i, b in enumerate(f.sections[t])
                     if _huffman_fields(b) or _rans_fields(b)]
            if coded:
                i = int(rng.choice(coded))
                blob = f.sections[t][i]
                edit = _edit_rans if _rans_fields(blob) else _edit_huffman
                f.sections[t][i] = edit(rng, blob)
        elif op < 78 and t is not None and f.sections[t]:  # a section's bytes
            i = int(rng.integers(len(f.sections[t])))
            f.sections[t][i] = _edit_bytes(rng, f.sections[t][i])
        elif op < 86 and tensors:  # the list of tensors
            how = rng.integers(4)
            if how == 0:
                tensors.append(json.loads(json.dumps(tensors[t])))
                f.sections.append(list(f.sections[t]))
            elif how == 1 and len(tensors) > 1:
                tensors.pop(t)
                f.sections.pop(t)
            elif how == 2 and len(tensors) > 1:
                j = int(rng.integers(len(tensors)))
                tensors[t], tensors[j] = tensors[j], tensors[t]
            else:
                tensors[t] = _near(rng, 0)
        elif op < 94:
            text = _raw_text(rng, json.dumps(f.manifest, separators=(",", ":")))
        elif op < 97:
            version, flags = int(rng.choice([0, 1, 2, 65535])), int(rng.choice([0, 0, 1]))
        else:
            f.manifest[str(rng.choice(["data_bytes", "format"]))] = _near(rng, 0)
    if rng.random() < 0.9:
        f.fix()
    return f.pack(text, 1 if version is None else version, flags or 0)


# ---- safetensors mutations -----------------------------------------------------------


def _walk_edit(rng: np.random.Generator, node: object) -> object:
    """A copy of JSON `node` with one randomly chosen node replaced, removed or grown."""
    if isinstance(node, dict | list) and node and rng.random() < 0.7:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        k = keys[rng.integers(len(keys))]
        node = dict(node) if isinstance(node, dict) else list(node)
        if rng.random() < 0.1:
            node.pop(k)
        elif isinstance(node, list) and rng.random() < 0.1:
            node.append(_near(rng, node[k]) if rng.random() < 0.5 else node[k])
        else:
            node[k] = _walk_edit(rng, node[k])
        return node
    if isinstance(node, str):
        return str(rng.choice(["tensor", "channel", "group", "", "minmax",
                               "torch.nn.modules.linear:Linear", "os:system", "0", "9", "@x",
                               "weight", "bias", "running_var", node + "x"]))
    return _near(rng, node)


def _edit_tensor(rng: np.random.Generator, t: torch.Tensor) -> torch.Tensor:
    op = rng.integers(8)
    if op == 0:
        return t.reshape(-1)
    if op == 1:
        return t.unsqueeze(0)
    if op == 2:
        return t.reshape(-1)[: int(rng.integers(t.numel() + 1))].clone()
    if op == 3:
        return torch.cat([t.reshape(-1)] * int(rng.integers(2, 5)))
    if op == 4:
        dtypes = [torch.float16, torch.float64, torch.int8, torch.uint8, torch.int64,
                  torch.bool, torch.int32, torch.bfloat16]
        return t.to(dtypes[rng.integers(len(dtypes))])
    if op == 5 and t.is_floating_point():
        fill = float(rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e38]))
        return torch.full_like(t, fill)
    if op == 6:
        return torch.zeros(int(rng.choice([0, 1, 10**5])), dtype=t.dtype)
    return t.clone()


def mutate_checkpoint(rng: np.random.Generator, seed: tuple[dict, dict]) -> bytes:
    tensors, metadata = dict(seed[0]), dict(seed[1])
    metadata.pop(INTEGRITY_KEY, None)
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(100)
        json_keys = [k for k in (PRUNED_KEY, "config") if k in metadata]
        if op < 40 and json_keys:
            key = str(rng.choice(json_keys))
            try:
                metadata[key] = json.dumps(_walk_edit(rng, json.loads(metadata[key])))
            except (ValueError, RecursionError):  # an earlier edit left it unparseable
                metadata[key] = _raw_text(rng, metadata[key])
        elif op < 50:
            keys = sorted(metadata) + ["extra"]
            key = str(rng.choice(keys))
            how = rng.integers(5)
            if how == 0:
                metadata.pop(key, None)
            elif how == 1:
                metadata[key] = _raw_text(rng, metadata.get(key, "[1]"))
            elif how == 2:
                metadata[key] = "[" * 50000 + "]" * 50000
            elif how == 3:
                metadata[key] = str(rng.choice(["penjing.quantized/1", "penjing.quantized/2",
                                                "penjing.quantized/3", "penjing.quantized/9"]))
            else:
                metadata[key] = "[" + "9" * int(rng.choice([19, 20, 5000])) + "]"
        elif op < 90 and tensors:
            names = sorted(tensors)
            name = names[rng.integers(len(names))]
            how = rng.integers(10)
            if how == 0:
                tensors.pop(name)
            elif how == 1:
                tensors[name + ".x"] = tensors.pop(name)
            else:
                tensors[name] = _edit_tensor(rng, tensors[name]).contiguous()
        else:
            tensors["extra.int"] = torch.zeros(3, dtype=torch.int8)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    roll = rng.random()
    if roll < 0.9:
        metadata[INTEGRITY_KEY] = checkpoint_digest(tensors, metadata)
    elif roll < 0.95:
        metadata[INTEGRITY_KEY] = "0" * 64
    data = safetensors_bytes(tensors, metadata=metadata)
    if rng.random() < 0.05:  # the safetensors header itself
        n = struct.unpack_from("<Q", data)[0]
        header = data[8 : 8 + n].decode()
        header = header.replace("[", "[" + str(int(rng.choice([0, 1, 2**40, 2**63]))) + ",", 1)
        blob = header.encode()
        data = struct.pack("<Q", len(blob)) + blob + data[8 + n :]
    return data


# ---- running inputs ------------------------------------------------------------------


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident size, to the current one
        return True
    except OSError:
        return False


def _nbytes(out: object) -> int:
    if isinstance(out, nn.Module):
        out = out.state_dict()
    if isinstance(out, tuple):
        return sum(_nbytes(o) for o in out)
    if isinstance(out, dict):
        return sum(t.numel() * t.element_size() for t in out.values())
    return 0


# Each loader takes the file and the model it fills (None for .pjz).
LOADERS: dict[str, Callable[[Path, nn.Module | None], object]] = {
    "pjz": lambda p, m: (pj.codec.inspect(p), pj.codec.load(p, max_memory=MAX_MEMORY)),
    "checkpoint": lambda p, m: pj.train.load_checkpoint(p, m),
    "pruned": lambda p, m: pj.prune.load_pruned(m, p),
    "quantized": lambda p, m: load_quantized(m, p),
    "model": lambda p, m: pj.load(p, mlp),
    "pjz_model": lambda p, m: pj.load(p, mlp, max_memory=MAX_MEMORY),
    "inspect": lambda p, m: _inspect(p),
    "recipe": lambda p, m: _recipe(p),
}


def _unchanged(model: nn.Module) -> bool:
    """Whether `model` still is the untouched `mlp()`: what a failed load must leave."""
    own, ref = model.state_dict(), _MLP.state_dict()
    return list(own) == list(ref) and all(
        own[k].shape == ref[k].shape and torch.equal(own[k], ref[k]) for k in ref
    )


@dataclass
class Stats:
    """What a fuzz run found; `failures` lists every input that broke a rule."""

    inputs: collections.Counter = field(default_factory=collections.Counter)
    accepted: collections.Counter = field(default_factory=collections.Counter)
    exceptions: collections.Counter = field(default_factory=collections.Counter)
    failures: list[tuple[str, str, bytes]] = field(default_factory=list)
    mutator_errors: int = 0  # mutations that failed (the seed ran instead): harness bugs
    slowest: tuple[float, str] = (0.0, "")
    peak_memory: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.inputs.values())


def _alarm(signum: int, frame: object) -> None:
    raise Timeout


class Fuzzer:
    """Mutates the seeds of every loader and runs the results, collecting Stats."""

    def __init__(self, folder: Path, seed: int = 0) -> None:
        self.folder = Path(folder)
        self.rng = np.random.default_rng(seed)
        self.pjz = pjz_seeds()
        self.checkpoints = checkpoint_seeds(self.folder / "seeds")
        self.path = self.folder / "input"
        self.track_memory = _reset_peak()
        self.models = {kind: mlp() for kind in ("checkpoint", "pruned", "quantized")}
        self.model_files = model_seeds(self.folder / "seeds")
        self.pjz_models = pjz_model_seeds()
        self.recipes = recipe_seeds()
        self.must_match = None  # what a model-file input must compute if it loads
        for kind in KINDS:  # warm up caches so the first input's imports are not counted
            self.run(kind, self.seed_bytes(kind), Stats())

    def seed_bytes(self, kind: str) -> bytes:
        self.must_match = None
        if kind == "pjz":
            return self.pjz[0]
        if kind in ("model", "inspect"):
            return safetensors_bytes(*self.model_files[0][:2])
        if kind == "pjz_model":
            return self.pjz_models[0]
        if kind == "recipe":
            return self.recipes[0].encode()
        tensors, metadata = self.checkpoints[kind][0]
        return safetensors_bytes(tensors, metadata=metadata)

    def mutate(self, kind: str) -> bytes:
        self.must_match = None
        pick = self.rng.integers
        if kind == "pjz":
            return mutate_pjz(self.rng, self.pjz[pick(len(self.pjz))])
        if kind == "pjz_model":
            return mutate_pjz(self.rng, self.pjz_models[pick(len(self.pjz_models))])
        if kind == "model" or (kind == "inspect" and self.rng.random() < 0.7):
            tensors, metadata, outputs = self.model_files[pick(len(self.model_files))]
            data, trusted = mutate_model(self.rng, tensors, metadata)
            self.must_match = None if trusted or kind != "model" else outputs
            return data
        if kind == "inspect":
            return mutate_pjz(self.rng, self.pjz_models[pick(len(self.pjz_models))])
        if kind == "recipe":
            return mutate_recipe(self.rng, self.recipes[pick(len(self.recipes))]).encode(
                "utf-8", "surrogatepass")
        seeds = self.checkpoints[kind]
        return mutate_checkpoint(self.rng, seeds[pick(len(seeds))])

    def run(self, kind: str, data: bytes, stats: Stats) -> None:
        self.path.write_bytes(data)
        base = _status("VmRSS") if self.track_memory and _reset_peak() else 0
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S + 2 * SLOW_PER_FILE_BYTE_S * len(data))
        start = time.perf_counter()
        out, error, refused = None, None, False
        # A failed load leaves the model as it was, so the same one serves the next input
        # (and is checked below); a successful one may have changed it.
        model = self.models.get(kind)
        try:
            out = LOADERS[kind](self.path, model)
            if kind == "model" and self.must_match is not None and _differs(
                    out, self.must_match):
                error = "forged loaded"
        except PenjingError:
            refused = True
            if model is not None and not _unchanged(model):
                error = "model changed"
        except Timeout:
            error = "Timeout"
        except Exception as err:  # what the harness exists to find
            error = type(err).__name__
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        seconds = time.perf_counter() - start
        peak = max(_status("VmHWM") - base, 0) if self.track_memory else 0
        decoded = _nbytes(out)
        if out is not None and kind in ("checkpoint", "pruned"):
            self.models[kind] = mlp()
        del out
        stats.inputs[kind] += 1
        stats.accepted[kind] += error is None and not refused
        stats.peak_memory = max(stats.peak_memory, peak)
        if seconds > stats.slowest[0]:
            stats.slowest = (seconds, kind)
        if error is None and seconds > (SLOW_S + SLOW_PER_FILE_BYTE_S * len(data)
                                        + SLOW_PER_BYTE_S * decoded):
            error = "slow"
        if error is None and peak > MEMORY_FACTOR * decoded + MEMORY_FIXED:
            error = "memory"
        if error is not None:
            stats.exceptions[error] += 1
            stats.failures.append((kind, error, data))

    def campaign(self, inputs: int, shares: dict[str, float], seconds: float = math.inf,
                 stats: Stats | None = None, progress: int = 0) -> Stats:
        """Run up to `inputs` mutated inputs, kinds drawn by `shares`, within `seconds`."""
        stats = stats or Stats()
        kinds = list(shares)
        p = np.array([shares[k] for k in kinds], dtype=float)
        p /= p.sum()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        # a runaway allocation becomes a MemoryError (counted), not the OOM killer
        limit = _status("VmSize") + 4 * MAX_MEMORY
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        start = time.perf_counter()
        try:
            for _ in range(inputs):
                if time.perf_counter() - start > seconds:
                    break
                kind = kinds[self.rng.choice(len(kinds), p=p)]
                try:
                    data = self.mutate(kind)
                except Exception:  # a harness bug must not end a long run; it is counted
                    stats.mutator_errors += 1
                    data = self.seed_bytes(kind)
                self.run(kind, data, stats)
                if progress and stats.total % progress == 0:
                    print(f"{stats.total:,} inputs, failures {dict(stats.exceptions)}",
                          file=sys.stderr, flush=True)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        stats.seconds += time.perf_counter() - start
        return stats


def load_seconds(decoded_mb: int, repeats: int = 3) -> tuple[int, float]:
    """(file bytes, median seconds) to load a valid .pjz of a pruned, weight-shared float32
    tensor of `decoded_mb` MiB: the table that shows loading is linear in size."""
    g = torch.Generator().manual_seed(decoded_mb)
    side = int(math.isqrt(decoded_mb * 2**20 // 4))
    path = Path(f"/tmp/penjing-fuzz-linear-{decoded_mb}.pjz")
    pj.codec.save({"w": _shared((side, side), 32, 0.9, g)}, path)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pj.codec.load(path)
        times.append(time.perf_counter() - start)
    size = path.stat().st_size
    path.unlink()
    return size, float(np.median(times))


def read_back(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, for a failing input saved to disk."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


# ---- model files (pj.save), .pjz through pj.load, inspect, recipes ---------------------

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def _differs(out: object, expected: torch.Tensor) -> bool:
    got = _outputs(out) if isinstance(out, nn.Module) else None
    return got is None or got.shape != expected.shape or not torch.allclose(
        got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def model_seeds(folder: Path) -> list[tuple[dict, dict, torch.Tensor]]:
    """(tensors, metadata, outputs) of `pj.save` files of `mlp`: channels removed, live
    masks and shared weights, INT8 weights and activations, INT4 weights in groups."""
    folder.mkdir(parents=True, exist_ok=True)
    models = []
    pruned = mlp()
    pj.prune.apply_(pruned, [Change("0", "weight", 0, (0, 2, 3, 5)),
                             Change("0", "bias", 0, (0, 2, 3, 5)),
                             Change("1", "weight", 0, (0, 2, 3, 5)),
                             Change("1", "bias", 0, (0, 2, 3, 5)),
                             Change("1", "running_mean", 0, (0, 2, 3, 5)),
                             Change("1", "running_var", 0, (0, 2, 3, 5)),
                             Change("3", "weight", 1, (0, 2, 3, 5))])
    models.append(pruned)
    shared = mlp()
    pj.quant.kmeans_(shared, bits=2)
    models.append(shared)
    calib = [torch.randn(16, 8, generator=torch.Generator().manual_seed(1))]
    models.append(ptq(mlp().eval(), calib, make_config(bits=8, granularity="channel",
                                                       act_bits=8)))
    models.append(ptq(mlp().eval(), calib, make_config(bits=4, granularity="group",
                                                       group_size=4, act_bits=None)))
    seeds = []
    for i, model in enumerate(models):
        path = folder / f"model{i}.safetensors"
        pj.save(model, path)
        tensors, metadata = _read_safetensors(path.read_bytes())
        seeds.append((tensors, metadata, _outputs(pj.load(path, mlp))))
    return seeds


def pjz_model_seeds() -> list[bytes]:
    """.pjz files of `mlp` (weight-shared, and with channels removed) for pj.load."""
    seeds = []
    g = torch.Generator().manual_seed(3)
    plain = mlp()
    with torch.no_grad():
        for layer in (plain[0], plain[3]):
            layer.weight.copy_(_shared(tuple(layer.weight.shape), 7, 0.6, g))
    seeds.append(b"".join(container._build(plain, None, container.MAX_CODEBOOK)[0]))
    pruned = copy.deepcopy(plain)
    pj.prune.apply_(pruned, [Change("0", "weight", 0, (1, 2, 4)), Change("0", "bias", 0, (1, 2, 4)),
                             Change("1", "weight", 0, (1, 2, 4)), Change("1", "bias", 0, (1, 2, 4)),
                             Change("1", "running_mean", 0, (1, 2, 4)),
                             Change("1", "running_var", 0, (1, 2, 4)),
                             Change("3", "weight", 1, (1, 2, 4))])
    seeds.append(b"".join(container._build(pruned, None, container.MAX_CODEBOOK)[0]))
    return seeds


def _flip_key(rng: np.random.Generator, key: str) -> str:
    i = int(rng.integers(len(key)))
    return key[:i] + chr(ord(key[i]) ^ (1 << int(rng.integers(5)))) + key[i + 1:]


def mutate_model(rng: np.random.Generator, tensors: dict, metadata: dict) -> tuple[bytes, bool]:
    """A mutated `pj.save` file, and whether it is trusted: its hash was recomputed over a
    tensor edit (a legitimately different model) or a self-consistent config edit (below).
    An untrusted one that loads must compute what its seed does."""
    tensors, metadata = dict(tensors), dict(metadata)
    metadata.pop(INTEGRITY_KEY, None)
    touched_tensors = self_consistent = False
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(100)
        if op < 45:  # the history: structure, configs, bits
            try:
                steps = json.loads(metadata["penjing.history"])
                metadata["penjing.history"] = json.dumps(_walk_edit(rng, steps))
            except (KeyError, ValueError, RecursionError):
                metadata["penjing.history"] = _raw_text(rng, metadata.get("penjing.history",
                                                                          "[]"))
        elif op < 60:  # a quantization config's field, as a forger would edit it
            try:
                steps = json.loads(metadata["penjing.history"])
                config = next(s["config"] for s in steps if s.get("op") == "quantize")
                spec = config[str(rng.choice(["weight", "activation"]))] or config["weight"]
                stored_as_nibbles = _levels(spec) <= 16
                field_ = str(rng.choice(["bits", "bits", "signed", "symmetric", "granularity"]))
                spec[field_] = (
                    int(rng.choice([2, 3, 4, 5, 6, 7, 8, 16])) if field_ == "bits" else
                    not spec[field_] if field_ != "granularity" else
                    {"kind": str(rng.choice(["tensor", "channel", "group"])), "axis": 0,
                     "size": int(rng.choice([1, 2, 4, 8]))})
                metadata["penjing.history"] = json.dumps(steps)
                # Weights of 4 bits or fewer are stored as nibbles relative to qmin, so a
                # 16-level spec read as another one (signed for unsigned, 3 bits widened
                # to 4) is a self-consistent file: nothing in it can tell the edit from
                # a file saved that way. Such an edit is not counted as a silent forgery.
                nibbles = stored_as_nibbles and _levels(spec) <= 16 and spec is config["weight"]
                self_consistent |= nibbles and field_ in ("bits", "signed")
            except (KeyError, ValueError, TypeError, StopIteration, AttributeError,
                    RecursionError):
                pass
        elif op < 65:  # nesting, numbers and garbage where the history is
            how = rng.integers(3)
            metadata["penjing.history"] = (
                "[" * int(rng.choice([17, 2000, 50000])) + "]" * 3 if how == 0 else
                '[{"op": "quantize", "config": null}]' if how == 1 else
                '[{"op": "compact", "layers": {"0": {}}}]')
        elif op < 70:
            key = str(rng.choice(sorted(metadata) + ["format"]))
            metadata[key] = _near(rng, metadata.get(key)) if rng.random() < 0.5 else str(
                rng.choice(["penjing.model/1", "penjing.model/2", "penjing.quantized/3", ""]))
            metadata[key] = str(metadata[key])
        elif tensors:
            names = sorted(tensors)
            name = names[rng.integers(len(names))]
            tensors[name] = _edit_tensor(rng, tensors[name]).contiguous()
            touched_tensors = True
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    roll = rng.random()
    rehashed = roll < 0.8
    if rehashed:
        metadata[INTEGRITY_KEY] = checkpoint_digest(tensors, metadata)
    elif roll < 0.9:  # the hash's key damaged, the digest still the true one
        metadata[_flip_key(rng, INTEGRITY_KEY)] = checkpoint_digest(tensors, metadata)
    # (else: no hash at all)
    return safetensors_bytes(tensors, metadata=metadata), rehashed and (
        touched_tensors or self_consistent)


def _levels(spec: dict) -> int:
    return 2 ** spec["bits"] if isinstance(spec.get("bits"), int) else 0


def _pjz_amplify(rng: np.random.Generator, f: _Pjz) -> None:
    """The amplification cases: one-symbol streams that claim many elements, and tensor
    lists repeated a thousand-fold."""
    tensors = f.manifest["tensors"]
    if not tensors:
        return
    if rng.random() < 0.5:
        t = int(rng.integers(len(tensors)))
        entry = tensors[t]
        if isinstance(entry, dict) and entry.get("encoding") == "dense":
            numel = int(rng.choice([2**16, 2**20, 2**22, 2**24]))
            entry["shape"], entry["nonzero"] = [numel], numel
            code = rans.encode(np.ones(numel, dtype=np.uint16)) if rng.random() < 0.5 else (
                bytes([rans.TAGS[15]]) + varint(2 * numel + 1) + varint(64)
                + rans._table_bytes(np.array([0, 2**16])) + b"\x00\x00\x01\x00" * 64)
            f.sections[t][-1] = code
        return
    times = int(rng.choice([100, 1000, 3000]))
    t = int(rng.integers(len(tensors)))
    # a thousand small tensors is the attack; a thousand large ones just a large file
    times = min(times, 2**20 // max(1, sum(map(len, f.sections[t]))))
    for i in range(times):
        clone = json.loads(json.dumps(tensors[t]))
        if isinstance(clone, dict):
            clone["name"] = f"{clone.get('name')}.{i}"
        tensors.append(clone)
        f.sections.append(list(f.sections[t]))


def mutate_pjz(rng: np.random.Generator, seed: bytes) -> bytes:
    """A .pjz edited in its fields (`_mutate_pjz_fields`), or (one in five) an
    amplification case."""
    if rng.random() >= 0.2:
        return _mutate_pjz_fields(rng, seed)
    f = _Pjz.parse(seed)
    _pjz_amplify(rng, f)
    f.fix()
    return f.pack()


def _inspect(path: Path) -> None:
    """`penjing inspect` as the shell runs it: 0 prints, 2 is a refusal, else a failure."""
    import contextlib
    import io

    from penjing.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["inspect", str(path)])
    if code == 2:
        raise PenjingError(err.getvalue())
    if code != 0:
        raise RuntimeError(f"penjing inspect exited {code}: {err.getvalue()[-300:]}")


def _recipe(path: Path) -> None:
    from penjing import recipes

    recipes.load(path)


def recipe_seeds() -> list[str]:
    folder = Path(__file__).resolve().parents[2] / "examples" / "recipes"
    return [p.read_text() for p in sorted(folder.glob("*.yaml"))]


def _bomb(rng: np.random.Generator) -> str:
    levels, width = int(rng.integers(3, 30)), int(rng.integers(2, 10))
    if rng.random() < 0.5:
        lines = ["b0: &b0 [x, y]"] + [
            f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]" for i in range(1, levels)]
    else:
        lines = ["b0: &b0 {k: 1}"] + [
            f"b{i}: &b{i} {{<<: [*b{i - 1}], k{i}: *b{i - 1}, j{i}: *b{i - 1}}}"
            for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def mutate_recipe(rng: np.random.Generator, seed: str) -> str:
    import yaml

    op = rng.integers(100)
    if op < 40:
        data = yaml.safe_load(seed)
        for _ in range(int(rng.integers(1, 4))):
            data = _walk_edit(rng, data)
        if isinstance(data, dict):
            data.pop("plugins", None)  # a recipe's plugins are imported: not under fuzzing
        return yaml.safe_dump(data, sort_keys=False)
    if op < 55:
        return _bomb(rng) + seed
    if op < 70:  # values no run can use
        value = str(rng.choice(["1e400", ".inf", "-.nan", "-1", "1180591620717411303424",
                                "0", "../../x.pjz", "/etc/x.onnx", "{}", "[]", "~"]))
        lines = seed.splitlines()
        at = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip()
              .startswith("#")]
        i = int(rng.choice(at))
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: {value}"
        return "\n".join(lines) + "\n"
    if op < 80:  # stages reordered
        import random

        data = yaml.safe_load(seed)
        random.Random(int(rng.integers(2**31))).shuffle(data["stages"])
        return yaml.safe_dump(data, sort_keys=False)
    if op < 90:
        return _edit_bytes(rng, seed.encode()).decode("utf-8", "surrogateescape")
    if op < 95:
        return "a: " + "[" * int(rng.choice([65, 1000, 100000])) + "\n" + seed
    return seed + "# " + "x" * int(rng.choice([1000, 300_000])) + "\n"
