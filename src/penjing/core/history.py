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
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from penjing.core import steps as registry

_ATTR = "_penjing_history"


def steps(model: nn.Module) -> list[dict]:
    """A copy of the steps recorded on `model`, oldest first (empty for an untouched model)."""
    return copy.deepcopy(model.__dict__.get(_ATTR, []))


def record(model: nn.Module, step: dict) -> None:
    """Append `step` (a dict whose "op" names a registered step) to `model`'s history."""
    if not isinstance(step, dict) or step.get("op") not in registry.ops():
        op = step.get("op") if isinstance(step, dict) else step
        raise ValueError(f"unknown history op {op!r}; one of {registry.ops()}")
    model.__dict__.setdefault(_ATTR, []).append(copy.deepcopy(step))


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
