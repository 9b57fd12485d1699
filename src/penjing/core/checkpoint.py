"""Checkpoint files: a state_dict as safetensors with a SHA-256 over its tensors and
metadata, written atomically and read without unpickling anything. Every penjing file
that holds tensors (model files, quantized checkpoints, pruned models) is one of these."""

from __future__ import annotations

import os

import torch
from torch import nn

from penjing.errors import FormatError
from penjing.io import atomic_write_bytes, remove_stale_temps

INTEGRITY_KEY = "penjing.sha256"  # metadata entry: SHA-256 of every tensor and metadata entry


def _canonical(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys in sorted order.

    The safetensors writer emits the metadata in hash-map order, so one model saved twice
    gave different files; the tensor bytes and their offsets are already in a fixed order,
    so sorting the header's keys (and padding it to 8 bytes again, as the format asks)
    makes the file a function of the state and metadata alone.
    """
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


# quantized checkpoints of formats 1 and 2 carry a tensor-only hash under this key, which
# their reader checks
_OLD_HASH_KEY = "sha256"
# pruned models written before the hash existed have this key alone; they still load (a
# damaged hash key in a newer one is caught by _damaged_hash_key)
_OLD_PRUNED_KEY = "penjing.prune.changes"


def _needs_hash(metadata: dict[str, str]) -> bool:
    """Whether a file's metadata says penjing wrote it: such a file must carry its hash
    (a flipped bit in the hash's key must not turn the check off)."""
    if _OLD_HASH_KEY in metadata:
        return False
    return any(k.startswith("penjing.") and k != _OLD_PRUNED_KEY for k in metadata) or str(
        metadata.get("format", "")).startswith("penjing.")


def _damaged_hash_key(metadata: dict[str, str]) -> str | None:
    """A metadata key one or two characters away from INTEGRITY_KEY: the hash's own key
    damaged, in a file that would otherwise load unchecked."""
    for key in metadata:
        if key != INTEGRITY_KEY and len(key) == len(INTEGRITY_KEY) and sum(
                a != b for a, b in zip(key, INTEGRITY_KEY, strict=True)) <= 2:
            return key
    return None


def checkpoint_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata entry but
    the digest itself: what `save_checkpoint` stores under INTEGRITY_KEY."""
    import hashlib
    import json

    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rest = sorted((k, v) for k, v in metadata.items() if k != INTEGRITY_KEY)
    h.update(json.dumps(rest).encode())
    return h.hexdigest()


def save_checkpoint(
    model: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> int:
    """Save a model's state_dict (and string `metadata`) as safetensors, atomically, with
    a SHA-256 of the tensors and metadata; return the bytes written."""
    from safetensors.torch import save

    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    metadata = dict(metadata or {})
    metadata[INTEGRITY_KEY] = checkpoint_digest(tensors, metadata)
    data = _canonical(save(tensors, metadata=metadata))
    atomic_write_bytes(path, data)
    return len(data)


def read_checkpoint(
    path: str | os.PathLike, what: str = "checkpoint",
    writer: str = "penjing.train.save_checkpoint",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of the safetensors file at `path`, read once and
    never unpickled. A missing file is FileNotFoundError, a folder IsADirectoryError, and
    an unreadable or damaged one FormatError, naming `what` the file should be and the
    `writer` that makes one. The SHA-256 penjing stores is checked; a file whose metadata
    says penjing wrote it must have one (only plain safetensors of other tools have
    none)."""
    import errno

    from safetensors import SafetensorError, safe_open


    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{what} {str(path)!r} is a folder; give the "
                                "safetensors file inside it")
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"{what} {str(path)!r} does not exist")
    remove_stale_temps(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError,
            MemoryError) as err:
        raise FormatError(
            f"cannot read {what} {str(path)!r} as safetensors ({err}); penjing writes one "
            f"with {writer}"
        ) from err
    stored = metadata.get(INTEGRITY_KEY)
    damaged = _damaged_hash_key(metadata)
    if stored is None and (damaged is not None or _needs_hash(metadata)):
        found = f" (a key reads {damaged!r})" if damaged else ""
        raise FormatError(
            f"{what} {str(path)!r} is corrupt or forged: a file penjing wrote must carry "
            f"{INTEGRITY_KEY!r}, its SHA-256, and this one has none{found}; write it again "
            f"with {writer}"
        )
    if stored is not None and stored != checkpoint_digest(tensors, metadata):
        raise FormatError(
            f"{what} {str(path)!r} is corrupt: its tensors or metadata do not match their "
            f"SHA-256; write it again with {writer}"
        )
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None):
    """Load a safetensors checkpoint (never pickle); fill `model` if given, else return the dict."""
    state, _ = read_checkpoint(path)
    return load_state(model, state, path) if model is not None else state


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps `state` from loading into `model`, in one line ('' if it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} is {'x'.join(map(str, state[k].shape)) or '()'} in the file but "
        f"{'x'.join(map(str, own[k].shape)) or '()'} here"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    parts = [
        f"{len(v)} {label} ({few(v)})"
        for label, v in (("missing", missing), ("unexpected", unexpected),
                         ("of another shape", shapes))
        if v
    ]
    return "; ".join(parts)


def tied(model: nn.Module) -> dict[str, str]:
    """{state_dict key: the earlier key whose tensor it is}: a tied embedding and head, or
    any parameter registered twice. Saving one of them is enough, and a model built with
    the same ties fills the other on load."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if value.numel() == 0:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(),
                 tuple(value.shape), tuple(value.stride()))
        if ident in seen:
            out[key] = seen[ident]
        else:
            seen[ident] = key
    return out


def _with_ties(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the keys of tied tensors it leaves out (penjing.save stores a tie
    once) filled from the key they are tied to."""
    aliases = {dup: kept for dup, kept in tied(model).items()
               if dup not in state and kept in state}
    if aliases:
        state = {**state, **{dup: state[kept] for dup, kept in aliases.items()}}
    return state


def _not_fitting(model: nn.Module, problem: str, path: str | os.PathLike) -> FormatError:
    return FormatError(
        f"the weights in {str(path)!r} do not fit {type(model).__name__}: tensors {problem}; "
        "give the checkpoint of this architecture (a pruned model: finalize_ it first)"
    )


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """The FormatError `load_state` would raise for keys or shapes that do not fit, before
    any tensor of `state` is converted (so a forged file costs no more than its bytes)."""
    problem = _mismatch(model, _with_ties(model, state))
    if problem:
        raise _not_fitting(model, problem, path)


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
) -> nn.Module:
    """`model` with `state` (read from `path`) loaded, or a FormatError naming in one line
    what does not fit; the model is checked first and left unchanged on failure. A key of
    a tied tensor that the file leaves out (penjing.save stores a tie once) comes from the
    key it is tied to."""
    state = _with_ties(model, state)
    problem = _mismatch(model, state)
    if not problem:
        try:
            model.load_state_dict(state)
            return model
        except RuntimeError as err:  # a dtype copy can still fail (complex into float)
            problem = str(err).strip().splitlines()[-1][:300]
    raise _not_fitting(model, problem, path)
