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
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing import history
from penjing.errors import FormatError, PenjingError, UnsupportedLayerError

FORMAT = "penjing.model/1"
_MASK_SUFFIX = ".mask"
_CODES_SUFFIX = ".codes"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_KINDS = {"Mask": "mask", "SharedWeights": "shared"}  # live parametrizations a file keeps


def _live(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """{layer: {tensor: kinds}} of the masks and shared weights on `model`, in the order
    they sit on each tensor; quantizers are left to the quantize step that put them there.
    Any other parametrization is an error that says how to save the model."""
    from penjing.quant.fakequant import WeightQuant

    found: dict[str, dict[str, list[str]]] = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, chain in module.parametrizations.items():
            kinds = []
            for p in chain:
                kind = _KINDS.get(type(p).__name__)
                if kind is None and not isinstance(p, WeightQuant):
                    raise UnsupportedLayerError(
                        f"{name or type(model).__name__}.{tensor} carries a "
                        f"{type(p).__name__} parametrization, which a model file cannot "
                        "rebuild; save a copy with it baked in (penjing.finalize_) or remove it"
                    )
                if kind is not None:
                    kinds.append(kind)
            if kinds:
                found.setdefault(name, {})[tensor] = kinds
    return found


def _check_frozen(model: nn.Module) -> None:
    from penjing.quant.fakequant import ActQuant

    for name, module in model.named_modules():
        if isinstance(module, ActQuant) and not module.frozen:
            raise ValueError(
                f"activation quantizer {name!r} is not calibrated yet; save the model that "
                "penjing.quant.ptq / qat returned"
            )


def save(
    model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> int:
    """Write `model` and its history to `path` (safetensors, atomically); return the bytes.

    Live pruning masks and shared weights are kept live (a later fine-tune keeps its zeros
    and trains the centroids); quantized weights are stored as integers. `metadata` adds
    string entries (e.g. {"model": "lenet5"}) under "penjing.<key>".
    """
    from penjing.quant.checkpoint import integer_state
    from penjing.train import save_checkpoint

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    if os.fspath(path).endswith(".pjz"):
        raise ValueError(f"{os.fspath(path)!r}: a .pjz file is written by penjing.codec.save "
                         "(Deep Compression coding); give penjing.save a .safetensors path")
    steps = history.steps(model)
    live = _live(model)
    if live:  # parametrizations go before the quantizers that were put on top of them
        at = next((i for i, s in enumerate(steps) if s["op"] == "quantize"), len(steps))
        steps.insert(at, {"op": "parametrize", "layers": live})
    quantized = any(s["op"] == "quantize" for s in steps)
    if quantized:
        _check_frozen(model)
        state = integer_state(model)
    else:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for layer, tensors in live.items():
        for tensor, kinds in tensors.items():
            for i, kind in enumerate(kinds):
                prefix = f"{layer}.parametrizations.{tensor}.{i}".lstrip(".")
                if kind == "mask":
                    state[f"{prefix}.mask"] = state[f"{prefix}.mask"] != 0
                elif kind == "shared":  # codes index 2^bits centroids: int64 wastes 7 bytes
                    codes = state[f"{prefix}.codes"]
                    small = codes.numel() == 0 or int(codes.max()) < 256
                    state[f"{prefix}.codes"] = codes.to(torch.uint8 if small else torch.int32)
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
    import errno

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
    from penjing.prune.surgery import METADATA_KEY
    from penjing.train import load_state, read_checkpoint

    tensors, metadata = read_checkpoint(path, "model file", "penjing.save")
    found = metadata.get("format")
    if found == FORMAT:
        return _replay(path, base, tensors, metadata)
    if isinstance(found, str) and found.startswith("penjing.model/"):
        raise FormatError(f"{os.fspath(path)!r} is a model file of format {found!r}, newer than "
                          f"this penjing reads ({FORMAT}); upgrade penjing")
    if isinstance(found, str) and found.startswith("penjing.quantized/"):
        from penjing.quant.checkpoint import load_quantized

        return load_quantized(base, path)
    if METADATA_KEY in metadata:
        from penjing.prune.surgery import load_pruned

        return load_pruned(base, path)
    return load_state(base, tensors, path)


def _steps(path: str | os.PathLike, text: str | None) -> list[dict]:
    from penjing.io import parse_json

    try:
        steps = parse_json(text, "the history")
        if not isinstance(steps, list) or not all(
                isinstance(s, dict) and s.get("op") in history.OPS for s in steps):
            raise ValueError(f"a list of steps with an op from {history.OPS} was expected")
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


def _replay(path, base: nn.Module, tensors: dict, metadata: dict) -> nn.Module:
    """Replay the file's history on `base`, then load its tensors."""
    from penjing.train import load_state

    steps = _steps(path, metadata.get("penjing.history"))
    model = base
    with _fitting(path, base):
        for step in steps:
            model = _apply(model, step, tensors)
        if any(s["op"] == "quantize" for s in steps):
            from penjing.quant.checkpoint import restore_state

            state = restore_state(model, tensors, path)
        else:
            state = dict(tensors)
        for key, value in state.items():
            if key.endswith(_MASK_SUFFIX) and value.dtype == torch.bool:
                state[key] = value.float()
            elif key.endswith(_CODES_SUFFIX) and value.dtype in (torch.uint8, torch.int32):
                state[key] = value.long()
    return load_state(model, state, path).eval()


def _apply(model: nn.Module, step: dict, tensors: dict) -> nn.Module:
    """`model` with one history step replayed (structure only; weights come later)."""
    op = step["op"]
    if op == "channels":
        from penjing.prune.surgery import _check_against, apply_, changes_from_rows

        changes = changes_from_rows(step.get("changes"))
        _check_against(model, changes)
        apply_(model, changes)
    elif op == "heads":
        from penjing.prune.heads import replay_heads_

        replay_heads_(model, dict(step["layers"]))
        history.record(model, step)
    elif op in ("hf_heads", "hf_ffn"):
        from penjing.prune.hf_heads import replay_hf_

        replay_hf_(model, step)
        history.record(model, step)
    elif op == "compact":
        from penjing.prune.compact import replay_compact_

        replay_compact_(model, dict(step["layers"]))
        history.record(model, step)
    elif op == "smooth":
        from penjing.quant.smooth import replay_smooth_

        replay_smooth_(model, step["layers"])
        history.record(model, step)
    elif op == "parametrize":
        _parametrize(model, step["layers"], tensors)
    elif op == "quantize":
        from penjing.quant.checkpoint import config_from_dict
        from penjing.quant.ptq import prepare, quantize_

        config = replace(config_from_dict(step["config"]), learnable=False)
        if step.get("in_place"):
            quantize_(model, config)
        else:
            model = prepare(model, config)
    return model


def _parametrize(model: nn.Module, layers: dict, tensors: dict) -> None:
    """Put empty masks and shared-weight tables where the file has them; loading the
    state fills them in."""
    from penjing.prune.masks import Mask
    from penjing.quant.shared import SharedWeights

    for layer, per_tensor in layers.items():
        module = model.get_submodule(layer)
        for tensor, kinds in per_tensor.items():
            for i, kind in enumerate(kinds):
                shape = getattr(module, tensor).shape
                if kind == "mask":
                    p = Mask(torch.ones(shape))
                elif kind == "shared":
                    key = f"{layer}.parametrizations.{tensor}.{i}.centroids".lstrip(".")
                    if key not in tensors or tensors[key].dim() != 1:
                        raise ValueError(f"no centroids {key!r} for the shared weights")
                    p = SharedWeights(torch.zeros(tensors[key].shape),
                                      torch.zeros(shape, dtype=torch.long))
                else:
                    raise ValueError(f"unknown parametrization {kind!r} on {layer}.{tensor}")
                parametrize.register_parametrization(module, tensor, p, unsafe=True)


def _load_pjz(path, base: nn.Module, max_memory: int | None) -> nn.Module:
    from penjing.codec.container import load_with_history
    from penjing.train import load_state

    state, steps = load_with_history(path, max_memory=max_memory)
    model = base
    with _fitting(path, base):
        for step in steps:
            if not isinstance(step, dict) or step.get("op") not in history.STRUCTURAL:
                raise ValueError(f"a .pjz history holds structural steps only, got {step!r}")
            model = _apply(model, step, state)
    return load_state(model, state, path).eval()


def _load_torch(path, base: nn.Module) -> nn.Module:
    """A PyTorch state dict (optionally under "state_dict" or "model"), never unpickled."""
    import pickle

    from penjing.train import load_state

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
        raise FormatError(
            f"{os.fspath(path)!r} is not a plain PyTorch state dict that loads with "
            f"weights_only=True ({str(err).splitlines()[0][:200]}); save model.state_dict() "
            "with torch.save, or convert the file to safetensors"
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
