"""One model file: `save` writes a model and what was done to it; `load` rebuilds it.

A compressed model is its architecture plus the steps that changed it: channels removed,
attention heads cut (torch or transformers attention), FFN neurons cut, convs compacted,
live pruning masks and shared weights, a quantization config. `save` writes the state_dict
as safetensors with that history in the metadata (format "penjing.model/1"); `load` builds
a fresh model of the architecture, replays the history on it and loads the weights, so
every stage of a pipeline reads the file the previous one wrote:

    pj.save(pruned, "pruned.safetensors")
    model = pj.load("pruned.safetensors", lambda: MyNet())   # same shapes, masks, config

Files of the older per-feature writers load through the same `load`: plain safetensors
checkpoints (`penjing.train.save_checkpoint`, or any tool's), pruned models
(`penjing.prune.save_pruned`), quantized checkpoints (`penjing.quant.save_quantized`),
Deep Compression `.pjz` files, and PyTorch `.pt`/`.pth`/`.bin` state dicts (read with
`weights_only=True`, so nothing is unpickled). Quantized weights are stored as integers,
masks as booleans, shared-weight codes in a byte where they fit.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import importlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from penjing.core import history, parametrize
from penjing.core import steps as registry
from penjing.core.checkpoint import (
    check_fits,
    load_state,
    read_checkpoint,
    save_checkpoint,
    tied,
)
from penjing.errors import FormatError, PenjingError

FORMAT = "penjing.model/1"
PRUNED_KEY = "penjing.prune.changes"  # metadata of the older pruned-model files
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# readers of .pjz files and of the files penjing wrote before model files existed, named
# by where they live: reading one imports only its reader, and this module no method
_READERS = {
    "pjz": "penjing.codec.container:load_with_history",
    "quantized": "penjing.quant.linear.checkpoint:load_quantized",
    "pruned": "penjing.prune.structural.surgery:load_pruned",
}


def _reader(name: str) -> Callable:
    module, attr = _READERS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _with_state(steps: list[dict]) -> registry.Step | None:
    """The last step of a history that stores tensors of its own (quantized integers)."""
    found = None
    for s in steps:
        step = registry.get(s["op"])
        if step.save_state is not None:
            found = step
    return found


def save(
    model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> int:
    """Write `model` and its history to `path` (safetensors, atomically); return the bytes.

    Live pruning masks and shared weights are kept live (a later fine-tune keeps its zeros
    and trains the centroids); quantized weights are stored as integers. `metadata` adds
    string entries (e.g. {"model": "lenet5"}) under "penjing.<key>".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    if os.fspath(path).endswith(".pjz"):
        raise ValueError(f"{os.fspath(path)!r}: a .pjz file is written by penjing.codec.save "
                         "(Deep Compression coding); give penjing.save a .safetensors path")
    steps = history.steps(model)
    live = parametrize.live(model)
    if live:  # masks and shared weights go before a step that stores tensors of its own
        at = next((i for i, s in enumerate(steps)
                   if registry.get(s["op"]).save_state is not None), len(steps))
        steps.insert(at, {"op": parametrize.STEP.op, "layers": live})
    own = _with_state(steps)
    if own is not None:
        state = own.save_state(model)
    else:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for duplicate in tied(model):  # a tied embedding and head: stored once
        state.pop(duplicate, None)
    parametrize.pack_(state, live)
    meta = {f"penjing.{k}": str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": FORMAT, "penjing.history": json.dumps(steps)})
    return save_checkpoint(state, path, meta)


def _fresh(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if not callable(model):
        raise TypeError("load needs the model's architecture: an nn.Module built fresh, or a "
                        f"function of no arguments returning one; got {type(model).__name__}")
    built = model()
    if not isinstance(built, nn.Module):
        raise TypeError(f"the model function returned {type(built).__name__}, not an nn.Module")
    return built


def load(
    path: str | os.PathLike,
    model: nn.Module | Callable[[], nn.Module],
    *,
    max_memory: int | None = None,
) -> nn.Module:
    """The model stored at `path`, rebuilt on `model`: a freshly built model of the
    architecture the file was saved from (left unchanged: the result is a new module) or a
    function of no arguments that builds one.

    Reads every format penjing writes (see the module docstring). A file that does not
    fit the architecture, or is damaged, is a FormatError naming what differs;
    `max_memory` bounds what a .pjz file may decode to.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"model file {os.fspath(path)!r} is a folder")
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"model file {os.fspath(path)!r} does not exist")
    base = _fresh(model)
    suffix = Path(path).suffix.lower()
    with open(path, "rb") as f:
        head = f.read(4)
    if suffix == ".pjz" or head == b"PJZ\x00":
        return _load_pjz(path, base, max_memory)
    if suffix in _TORCH_SUFFIXES:
        return _load_torch(path, base)
    tensors, metadata = read_checkpoint(path, "model file", "penjing.save")
    found = metadata.get("format")
    if found == FORMAT:
        return _replay(path, base, tensors, metadata)
    if isinstance(found, str) and found.startswith("penjing.model/"):
        raise FormatError(f"{os.fspath(path)!r} is a model file of format {found!r}, newer than "
                          f"this penjing reads ({FORMAT}); upgrade penjing")
    if isinstance(found, str) and found.startswith("penjing.quantized/"):
        return _reader("quantized")(base, path)
    if PRUNED_KEY in metadata:
        return _reader("pruned")(base, path)
    return load_state(base, tensors, path)


def _steps(path: str | os.PathLike, text: str | None) -> list[dict]:
    try:
        steps = history.read(text)
    except ValueError as err:
        raise FormatError(f"{os.fspath(path)!r}: its history cannot be read ({err}); write "
                          "the file with penjing.save") from err
    return steps


@contextlib.contextmanager
def _fitting(path, base: nn.Module):
    """Turn what replaying a file on `base` can raise into one FormatError."""
    try:
        yield
    except FormatError:
        raise
    except (PenjingError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError) as err:
        raise FormatError(
            f"{os.fspath(path)!r} does not fit this {type(base).__name__} ({err}): it was "
            "saved from another architecture; give the model it was saved from"
        ) from err


def replay(model: nn.Module, steps: list[dict], tensors: dict) -> nn.Module:
    """`model` with every step of a history replayed through the registry (structure
    only; the weights load afterwards)."""
    for step in steps:
        model = registry.get(step["op"]).replay(model, step, tensors)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the replay of step {step['op']!r} returned "
                            f"{type(model).__name__}, not the model")
    return model


def _replay(path, base: nn.Module, tensors: dict, metadata: dict) -> nn.Module:
    """Replay the file's history on `base`, then load its tensors."""
    steps = _steps(path, metadata.get("penjing.history"))
    with _fitting(path, base):
        model = replay(base, steps, tensors)
        own = _with_state(steps)
        state = own.load_state(model, tensors, path) if own is not None else dict(tensors)
        check_fits(model, state, path)  # before codes and masks are widened
        parametrize.unpack_(state)
    return load_state(model, state, path).eval()


def _load_pjz(path, base: nn.Module, max_memory: int | None) -> nn.Module:
    built: list[nn.Module] = []

    def fits(shapes: dict, steps: list) -> None:
        """Replay the structure, then compare the file's tensors with the model's before a
        byte is decoded: a file that claims tensors the model has no room for is refused
        at the cost of its manifest."""
        with _fitting(path, base):
            for step in steps:
                op = step.get("op") if isinstance(step, dict) else None
                if op not in registry.ops() or not registry.get(op).structural:
                    raise ValueError(f"a .pjz history holds structural steps only, got {step!r}")
            history.check(steps)
            model = replay(base, steps, {})
        claimed = {name: torch.empty(shape, dtype=dtype, device="meta")  # no memory
                   for name, (dtype, shape) in shapes.items()}
        check_fits(model, claimed, path)
        built.append(model)

    state, _ = _reader("pjz")(path, max_memory=max_memory, check=fits)
    return load_state(built[0], state, path).eval()


def _torch_reason(err: BaseException) -> str:
    """torch.load's reason in one whole sentence: for a pickle that would rebuild objects,
    which one it names, and that unpickling it could run code (torch's own message is a
    page of advice with terminal colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "TorchScript" in text:
        return ("it is a TorchScript archive (torch.jit.save), which holds a program, not a "
                "state dict")
    found = re.search(r"WeightsUnpickler error: (.+?)(?:\.\s|\.?$)", text, re.M)
    if found:
        return (f"{found.group(1).strip()}; rebuilding such objects means unpickling, which "
                "can run code from the file, so penjing does not")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if len(first) <= 300 else first[:first.rfind(" ", 0, 300)] + " ..."


def _load_torch(path, base: nn.Module) -> nn.Module:
    """A PyTorch state dict (optionally under "state_dict" or "model"), never unpickled."""
    try:
        with warnings.catch_warnings():  # torch's advice; the FormatError below says it
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
        raise FormatError(
            f"{os.fspath(path)!r} is not a plain PyTorch state dict that loads with "
            f"weights_only=True ({_torch_reason(err)}); save model.state_dict() with "
            "torch.save, or convert the file to safetensors"
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FormatError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a dict of "
                          "tensors; save model.state_dict()")
    return load_state(base, obj, path).eval()
