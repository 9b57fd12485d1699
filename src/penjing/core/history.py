"""What was done to a model's structure, kept on the model itself.

Structured pruning, head pruning (torch and transformers attention), FFN neuron pruning,
compaction and quantization change which modules a model has and their shapes, so its
state_dict no longer fits a freshly built model of the same architecture. Each of those
steps appends a small JSON-ready record here; `penjing.save` writes the list into the
model file and `penjing.load` replays it on a fresh model before loading the weights. The
list lives in the module's `__dict__`, so `copy.deepcopy` carries it along; `carry` copies
it onto a new module (a traced GraphModule) made from an old one.

Steps (every key JSON):
    {"op": "channels", "changes": [[module, tensor, dim, [kept indices]], ...]}
    {"op": "heads", "layers": {layer: [kept head indices]}}
    {"op": "hf_heads", "layers": {transformers attention module: [kept head indices]}}
    {"op": "hf_ffn", "layers": {first FFN Linear: [kept neuron indices]}}
    {"op": "compact", "layers": {layer: ["stripe" | "shape", [[kept indices] per kernel
        position]]}}
    {"op": "smooth", "layers": [Linear layers wrapped in quant.smooth.ScaledInput]}
    {"op": "parametrize", "layers": {layer: {tensor: ["mask" | "shared", ...]}}}
    {"op": "quantize", "config": QuantConfig as penjing.quant.linear.checkpoint.config_to_dict}

Which ops exist, and how each is replayed, is the registry's (`penjing.core.steps`).
`read` checks a history read from a file against these shapes (and a step's own `check`)
before anything is replayed or printed: `penjing.load` and `penjing inspect` both use it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from penjing.core import steps as registry
from penjing.io import parse_json

# The records above as shapes: a type, or [shape] for a list of it, {"*": shape} for a
# mapping of names to it, {key: shape} for an object with those keys (others may follow),
# a tuple for a fixed-length list, a set for a choice of values, "?" + shape for None too.
_INDEX, _NAME = "index", "name"
_KEPT = [_INDEX]
_SPEC = {"bits": range(1, 33), "symmetric": bool, "signed": bool,
         "granularity": {"kind": {"tensor", "channel", "group"}}}
RECORDS: dict[str, dict] = {
    "channels": {"changes": [(_NAME, _NAME, range(0, 33), _KEPT)]},
    "heads": {"layers": {"*": _KEPT}},
    "hf_heads": {"layers": {"*": _KEPT}},
    "hf_ffn": {"layers": {"*": _KEPT}},
    "compact": {"layers": {"*": ({"stripe", "shape"}, [_KEPT])}},
    "smooth": {"layers": [_NAME]},
    "parametrize": {"layers": {"*": {"*": [{"mask", "shared"}]}}},
    "quantize": {"config": {"weight": "?spec", "activation": "?spec", "observer": str,
                            "weight_range": str, "types": [str], "layers": {"*": "spec|bool"},
                            "first": bool, "last": bool, "learnable": bool}},
}
# a count of anything a model holds (an index, a head, a channel) fits in 63 bits
_MAX_INDEX = 2**63 - 1


def _check(value: Any, shape: Any, where: str) -> None:
    """A ValueError naming `where` unless `value` has `shape` (see RECORDS)."""
    def wrong(what: str) -> ValueError:
        return ValueError(f"{where} must be {what}, got {str(value)[:60]!r}")

    if shape == _INDEX:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INDEX:
            raise wrong("a non-negative integer")
    elif shape == _NAME or shape is str:
        if not isinstance(value, str):
            raise wrong("a string")
    elif shape is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
    elif shape == "?spec":
        if value is not None:
            _check(value, "spec", where)
    elif shape == "spec|bool":
        if not isinstance(value, bool):
            _check(value, "spec", where)
    elif shape == "spec":
        _check(value, _SPEC, where)
        g = value["granularity"]
        if g["kind"] == "channel":
            _check(g.get("axis"), range(-8, 8), f"{where}.granularity.axis")
        elif g["kind"] == "group":
            _check(g.get("size"), range(1, 2**31), f"{where}.granularity.size")
    elif isinstance(shape, range):
        if isinstance(value, bool) or not isinstance(value, int) or value not in shape:
            raise wrong(f"an integer in [{shape.start}, {shape.stop - 1}]")
    elif isinstance(shape, set):
        if not isinstance(value, str) or value not in shape:
            raise wrong(f"one of {sorted(shape)}")
    elif isinstance(shape, tuple):
        if not isinstance(value, list) or len(value) != len(shape):
            raise wrong(f"a list of {len(shape)}")
        for i, (v, s) in enumerate(zip(value, shape, strict=True)):
            _check(v, s, f"{where}[{i}]")
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise wrong("a list")
        for i, v in enumerate(value):
            _check(v, shape[0], f"{where}[{i}]")
    elif isinstance(shape, dict) and "*" in shape:
        if not isinstance(value, dict):
            raise wrong("an object")
        for k, v in value.items():
            _check(v, shape["*"], f"{where}.{k}")
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise wrong("an object")
        for k, s in shape.items():
            if k not in value:
                raise ValueError(f"{where} has no {k!r}")
            _check(value[k], s, f"{where}.{k}")


def check(steps: object) -> list[dict]:
    """`steps` if it is a history penjing can replay: a list of records with a known op,
    each of the shape its op has (module docstring) and passing its step's own check;
    else a ValueError naming the first record and key that is wrong."""
    known = registry.ops()
    if not isinstance(steps, list):
        raise ValueError(f"a history is a list of steps, got {type(steps).__name__}")
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or step.get("op") not in known:
            op = step.get("op") if isinstance(step, dict) else step
            raise ValueError(f"step {i + 1}: op {str(op)[:60]!r} is not one of "
                             f"{', '.join(known)}")
        shape = RECORDS.get(step["op"])
        if shape is not None:
            _check(step, shape, f"step {i + 1} ({step['op']})")
        own = registry.get(step["op"]).check
        if own is not None:
            own(step)
    return steps


def read(text: object) -> list[dict]:
    """The history in a file's JSON `text`, checked (`check`); nesting and numbers are
    bounded before parsing. Anything wrong is a ValueError saying what."""
    return check(parse_json(text, "the history"))

_ATTR = "_penjing_history"


_ATOMS = (int, float, str, bool, type(None))


def _copied(value: Any) -> Any:
    """A deep copy of a record: plain dicts, lists and tuples are copied item by item
    (copy.deepcopy takes seconds on the hundreds of thousands of indices a large
    model's channel changes keep), anything else by copy.deepcopy."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is dict:
        return {k: _copied(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        items = [v if type(v) in _ATOMS else _copied(v) for v in value]
        return items if kind is list else tuple(items)
    return copy.deepcopy(value)


def steps(model: nn.Module) -> list[dict]:
    """A copy of the steps recorded on `model`, oldest first (empty for an untouched model)."""
    return _copied(model.__dict__.get(_ATTR, []))


def record(model: nn.Module, step: dict) -> None:
    """Append `step` (a dict whose "op" names a registered step) to `model`'s history."""
    if not isinstance(step, dict) or step.get("op") not in registry.ops():
        op = step.get("op") if isinstance(step, dict) else step
        raise ValueError(f"unknown history op {op!r}; one of {registry.ops()}")
    model.__dict__.setdefault(_ATTR, []).append(_copied(step))


def carry(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give `target` (a module built from `source`) the history of `source`; returns it."""
    target.__dict__[_ATTR] = steps(source)
    return target


def replaying(rebuild: Callable[[nn.Module, dict], object]) -> Callable:
    """A step's replay (see penjing.core.steps) from a function that rebuilds one record's
    structure on a model in place: it rebuilds, records the step again, returns the model."""

    def replay(model: nn.Module, step: dict, tensors: object) -> nn.Module:
        rebuild(model, step)
        record(model, step)
        return model

    return replay
