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
    {"op": "quantize", "config": QuantConfig as penjing.quant.checkpoint.config_to_dict}
"""

from __future__ import annotations

import copy

from torch import nn

_ATTR = "_penjing_history"
OPS = ("channels", "heads", "hf_heads", "hf_ffn", "compact", "smooth", "parametrize",
       "quantize")
STRUCTURAL = ("channels", "heads", "hf_heads", "hf_ffn", "compact", "smooth")  # a .pjz keeps


def steps(model: nn.Module) -> list[dict]:
    """A copy of the steps recorded on `model`, oldest first (empty for an untouched model)."""
    return copy.deepcopy(model.__dict__.get(_ATTR, []))


def record(model: nn.Module, step: dict) -> None:
    """Append `step` (a dict with an "op" from OPS) to `model`'s history."""
    if step.get("op") not in OPS:
        raise ValueError(f"unknown history op {step.get('op')!r}; one of {OPS}")
    model.__dict__.setdefault(_ATTR, []).append(copy.deepcopy(step))


def carry(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give `target` (a module built from `source`) the history of `source`; returns it."""
    target.__dict__[_ATTR] = steps(source)
    return target
