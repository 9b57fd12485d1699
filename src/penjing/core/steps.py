"""The registry of steps: for every method that changes what a model is, how it is recorded,
replayed on a fresh model, configured and run.

A step that changes a model's structure or parametrization (channels removed, heads cut,
layers wrapped, quantizers inserted, masks and shared weights put on) appends a record
`{"op": name, ...}` to the model's history (`penjing.core.history`). `penjing.save` writes the
history, and `penjing.load` replays each record on a freshly built model before the
weights load; a `.pjz` keeps the records of the steps marked `structural`. A step that
also has a `config` (a frozen dataclass) and an `apply` function is a recipe stage
(`stage: <name>` with the config's fields as keys) and a CLI verb (`penjing apply <name>`
with one flag per field). Model files, `.pjz` files, recipes and the CLI read this
registry; none keeps a list of its own.

Each method declares its `Step` beside its own code. The built-in ones are listed in
`BUILTIN` by where they live and imported the first time they are asked for, so this
module imports no method and reading a model file imports only the methods it names. A
method of one's own is one call:

>>> from penjing.core import steps
>>> steps.register(steps.Step("scale", replay=replay_scale, config=Scale, apply=scale_))
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from penjing.errors import PenjingError

Tensors = Mapping[str, torch.Tensor]


class ConfigError(PenjingError, ValueError):
    """A step's config with an unknown field or a value outside what the field allows."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One method as the rest of penjing sees it."""

    op: str  # the "op" of its history records: lowercase letters, digits and '_'
    # rebuilds what one record did on a fresh model (weights load afterwards): returns the
    # model, a new one when the step builds a new module (a traced GraphModule)
    replay: Callable[[nn.Module, dict, Tensors], nn.Module]
    # a .pjz keeps the record: the step changes modules or shapes, and float weights load
    # after it (masks and quantizers are baked into the float weights a .pjz stores)
    structural: bool = False
    # checks a record read from a file before anything is replayed (raise ValueError)
    check: Callable[[dict], None] | None = None
    # options of a recipe stage and a CLI verb: a frozen dataclass whose __post_init__
    # raises ValueError naming the field and what it allows
    config: type | None = None
    # runs the method on a model with a config and records its history; returns the model
    apply: Callable[[nn.Module, Any], nn.Module] | None = None
    # the tensors a model file stores when not the state_dict (integer weights), and the
    # way back to a state_dict after replay; the last step in a history that has them wins
    save_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    load_state: Callable[[nn.Module, dict[str, torch.Tensor], str], dict] | None = None
    help: str = ""  # one line: what the step does (the CLI verb's help)

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.op):
            raise ValueError(f"a step's op is lowercase letters, digits and '_' starting with a "
                             f"letter, got {self.op!r}")
        if not callable(self.replay):
            raise TypeError(f"step {self.op!r}: replay must be a function (model, record, "
                            f"tensors) -> model, got {type(self.replay).__name__}")
        if (self.config is None) != (self.apply is None):
            raise ValueError(f"step {self.op!r}: give both config (a frozen dataclass) and apply "
                             "(model, config) -> model, or neither")
        if self.config is not None and not dataclasses.is_dataclass(self.config):
            raise TypeError(f"step {self.op!r}: config must be a dataclass type, got "
                            f"{self.config!r}")


# op -> "module:attribute" of the Step declared beside the method's code
BUILTIN: dict[str, str] = {
    "channels": "penjing.prune.structural.surgery:STEP",
    "heads": "penjing.prune.heads:STEP",
    "hf_heads": "penjing.prune.hf_heads:HEADS_STEP",
    "hf_ffn": "penjing.prune.hf_heads:FFN_STEP",
    "compact": "penjing.prune.masking.compact:STEP",
    "smooth": "penjing.quant.linear.smooth:STEP",
    "parametrize": "penjing.core.parametrize:STEP",
    "quantize": "penjing.quant.linear.ptq:STEP",
    "distill": "penjing.distill.kd:STEP",
}

_REGISTERED: dict[str, Step] = {}


def register(step: Step, *, replace: bool = False) -> Step:
    """Add `step` to the registry (a method of one's own); returns it.

    A name already taken is an error unless `replace=True`, so that two packages cannot
    silently give one history op two meanings.
    """
    if not isinstance(step, Step):
        raise TypeError(f"register takes a penjing.core.steps.Step, got {type(step).__name__}")
    taken = step.op in _REGISTERED or step.op in BUILTIN
    if taken and not replace:
        raise ValueError(f"a step named {step.op!r} is registered already; give another op, "
                         "or register(..., replace=True) to replace it")
    _REGISTERED[step.op] = step
    return step


def unregister(op: str) -> None:
    """Remove a step added with `register` (built-in steps come back on the next lookup)."""
    _REGISTERED.pop(op, None)


def ops() -> tuple[str, ...]:
    """Every op a history may hold: built-in first, then registered ones."""
    return tuple(dict.fromkeys([*BUILTIN, *_REGISTERED]))


def get(op: str) -> Step:
    """The step recorded as `op`; a ValueError naming the known ops when there is none."""
    if isinstance(op, str) and op in _REGISTERED:
        return _REGISTERED[op]
    if isinstance(op, str) and op in BUILTIN:
        module, attr = BUILTIN[op].split(":")
        step = getattr(importlib.import_module(module), attr)
        _REGISTERED[op] = step
        return step
    raise ValueError(f"unknown step {op!r}; known steps: {', '.join(ops())} (a step of "
                     "one's own is added with penjing.core.steps.register)")


def runnable() -> dict[str, Step]:
    """The steps that have a config and an apply function: recipe stages and CLI verbs."""
    return {op: s for op in ops() if (s := get(op)).apply is not None}


def _field_types(config: type) -> dict[str, Any]:
    import typing

    hints = typing.get_type_hints(config)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config) if f.init}


def make_config(config: type, values: Mapping[str, Any], where: str = "") -> Any:
    """An instance of the dataclass `config` from `values` (a recipe stage's keys, CLI flags
    or a config's own fields), each value checked against its field's type.

    An unknown field, a value of the wrong type and a value the config's own check refuses
    are one ConfigError in the same words from Python, a recipe and the command line:
    `{where}: unknown field 'scal' (did you mean 'scale'?); allowed: scale, bias`.
    """
    import difflib

    from pydantic import TypeAdapter, ValidationError

    prefix = f"{where}: " if where else ""
    types = _field_types(config)
    for key in values:
        if key not in types:
            close = difflib.get_close_matches(str(key), list(types), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}unknown field {key!r}{hint}; allowed: "
                              f"{', '.join(types) or 'none'}")
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = TypeAdapter(types[key]).validate_python(value)
        except ValidationError as err:
            problem = err.errors()[0]["msg"].replace("Input should be", "must be")
            raise ConfigError(f"{prefix}{key}: {problem}, got {value!r}") from None
    try:
        return config(**checked)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix}{err}") from None


def run(op: str, model: nn.Module, config: Any) -> nn.Module:
    """Run step `op` on `model` with `config` (its dataclass, or a mapping of its fields),
    checked by `make_config`; returns the model the step gives back."""
    step = get(op)
    if step.apply is None or step.config is None:
        raise ValueError(f"step {op!r} is replayed from files only; steps that run with a "
                         f"config: {', '.join(runnable()) or 'none'}")
    if isinstance(config, step.config):
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise TypeError(f"step {op!r} takes a {step.config.__name__} or a mapping of its "
                        f"fields, got {type(config).__name__}")
    result = step.apply(model, make_config(step.config, values, op))
    if not isinstance(result, nn.Module):
        raise TypeError(f"step {op!r}: apply returned {type(result).__name__}, not the model")
    return result
