"""Save a linearly quantized model as safetensors with integer weights, and load it back.

The file holds the state of the model `ptq` / `qat` returned, with every fake-quantized
weight stored as its integers instead of floats: two to a byte when its range fits in 4
bits (INT4, INT3, INT2), else in the smallest of int8, uint8, int16 and int32 that holds
the range; plus the QuantConfig and a SHA-256 of the tensors in the metadata. Loading
rebuilds the quantized model from a fresh float model of the same architecture:
`prepare` with the stored config, then the stored scales, zero points and integers.
Nothing is unpickled, and nothing the file names is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.core import steps
from penjing.core.checkpoint import INTEGRITY_KEY, load_state, read_checkpoint, save_checkpoint
from penjing.errors import FormatError, PenjingError
from penjing.io import parse_json
from penjing.quant.linear.config import QuantConfig, resolve_filter
from penjing.quant.linear.fakequant import ActQuant, WeightQuant
from penjing.quant.linear.primitives import (
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    dequantize,
    quantize,
)

# 2: weights of 4 bits and fewer packed two to a byte; 3: the file's SHA-256
# (penjing.sha256, see save_checkpoint) covers the config as well as the tensors.
FORMAT = "penjing.quantized/3"
# 1 stored every weight in a whole integer type; 1 and 2 hash the tensors only ("sha256")
TENSOR_HASHED = ("penjing.quantized/1", "penjing.quantized/2")
READABLE = (*TENSOR_HASHED, FORMAT)
_INT_SUFFIX = ".int"  # key suffix of a weight stored as integers
_NIBBLE_SUFFIX = ".int4"  # key suffix of a weight stored two integers to a byte


def _spec_to_dict(spec: QuantSpec | None) -> dict | None:
    if spec is None:
        return None
    g = spec.granularity
    granularity = (
        {"kind": "tensor"} if isinstance(g, PerTensor)
        else {"kind": "channel", "axis": g.axis} if isinstance(g, PerChannel)
        else {"kind": "group", "size": g.size}
    )
    return {"bits": spec.bits, "symmetric": spec.symmetric, "signed": spec.signed,
            "granularity": granularity}


def _spec_from_dict(d: dict | None) -> QuantSpec | None:
    if d is None:
        return None
    g = d["granularity"]
    granularity = {"tensor": lambda: PerTensor(), "channel": lambda: PerChannel(g["axis"]),
                   "group": lambda: PerGroup(g["size"])}[g["kind"]]()
    return QuantSpec(d["bits"], d["symmetric"], d["signed"], granularity)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _type_from_name(name: str) -> type[nn.Module]:
    """The module class `name` ('module:QualName') names, looked up among the modules
    already imported: a file must not make us import, and so run, code it names."""
    module, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module)
    if obj is None:
        raise ValueError(
            f"layer type {name!r}: module {module!r} is not imported; import it (create the "
            "model) before loading"
        )
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"layer type {name!r} does not name an nn.Module class")
    return obj


def config_to_dict(config: QuantConfig) -> dict:
    """A JSON-able form of `config`; a callable observer or weight range is stored by name
    ('custom'): it only matters while calibrating, and a stored model is calibrated."""
    def name(v: Any) -> str:
        return v if isinstance(v, str) else "custom"

    if config.filter_fn is not None:
        raise ValueError("a QuantConfig with a filter_fn is stored after "
                         "penjing.quant.linear.config.resolve_filter(config, model)")
    return {
        "weight": _spec_to_dict(config.weight),
        "activation": _spec_to_dict(config.activation),
        "observer": name(config.observer),
        "weight_range": name(config.weight_range),
        "types": [_type_name(t) for t in config.types],
        "layers": {k: v if isinstance(v, bool) else _spec_to_dict(v)
                   for k, v in config.layers.items()},
        "first": config.first,
        "last": config.last,
        "learnable": config.learnable,
    }


def config_from_dict(d: dict) -> QuantConfig:
    """Undo `config_to_dict`."""
    def name(v: str) -> str:
        return "minmax" if v == "custom" else v

    return QuantConfig(
        weight=_spec_from_dict(d["weight"]),
        activation=_spec_from_dict(d["activation"]),
        observer=name(d["observer"]),
        weight_range=name(d["weight_range"]),
        types=tuple(_type_from_name(t) for t in d["types"]),
        layers={k: v if isinstance(v, bool) else _spec_from_dict(v)
                for k, v in d["layers"].items()},
        first=d["first"],
        last=d["last"],
        learnable=d["learnable"],
    )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _integer_weights(model: nn.Module) -> dict[str, WeightQuant]:
    """{state key of a float weight: its quantizer} for every parametrized tensor whose
    only parametrization is a WeightQuant (a pruning mask before it keeps floats)."""
    found = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, chain in module.parametrizations.items():
            if len(chain) == 1 and isinstance(chain[0], WeightQuant):
                prefix = f"{name}." if name else ""
                found[f"{prefix}parametrizations.{tensor}.original"] = chain[0]
    return found


def _storage_dtype(spec: QuantSpec) -> torch.dtype:
    """The smallest integer dtype that holds [qmin, qmax] (uint8 for unsigned 8-bit)."""
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= spec.qmin and spec.qmax <= info.max:
            return dtype
    return torch.int32  # unsigned 16-bit


def _fits_a_nibble(spec: QuantSpec) -> bool:
    return spec.qmax - spec.qmin <= 15


def pack_nibbles(ints: torch.Tensor, qmin: int) -> torch.Tensor:
    """Integers in [qmin, qmin + 15] as uint8, two per byte: element 2i in the low nibble
    of byte i, element 2i + 1 in the high one (a last odd element leaves it 0)."""
    flat = (ints.reshape(-1).to(torch.int32) - qmin).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, qmin: int, shape: torch.Size) -> torch.Tensor:
    """The int32 tensor of `shape` that `pack_nibbles` stored in `packed`."""
    numel = shape.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"{packed.numel()} packed bytes of {packed.dtype} cannot hold a weight of shape "
            f"{tuple(shape)}"
        )
    flat = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]
    return (flat.to(torch.int32) + qmin).reshape(shape)


def check_calibrated(model: nn.Module) -> None:
    """A ValueError naming the first activation quantizer that has not seen data yet."""
    for name, module in model.named_modules():
        if isinstance(module, ActQuant) and not module.frozen:
            raise ValueError(
                f"activation quantizer {name!r} is not calibrated yet; save the model that "
                "penjing.quant.ptq / qat returned"
            )


def save_quantized(model: nn.Module, config: QuantConfig, path: str | os.PathLike) -> int:
    """Write the quantized `model` (from `ptq` / `qat` with `config`) to `path`; return
    the file size in bytes. Weights are stored as integers (packed two to a byte at 4
    bits and below), the rest as float32."""
    check_calibrated(model)
    state = integer_state(model)
    config = resolve_filter(config, model)
    metadata = {"format": FORMAT, "config": json.dumps(config_to_dict(config))}
    return save_checkpoint(state, path, metadata)  # adds the SHA-256 of all of it


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = read_checkpoint(path, "quantized checkpoint",
                                        "penjing.quant.save_quantized")
    found = metadata.get("format")
    if isinstance(found, str) and found.startswith("penjing.quantized/") and found not in READABLE:
        raise FormatError(
            f"{str(path)!r} is a quantized checkpoint of format {found!r}, newer than this "
            f"penjing reads ({', '.join(READABLE)}); upgrade penjing"
        )
    if found not in READABLE:
        raise FormatError(
            f"{str(path)!r} is not a penjing quantized checkpoint (format "
            f"{metadata.get('format')!r}, expected {FORMAT!r}); write one with save_quantized"
        )
    if found in TENSOR_HASHED:
        if _digest(tensors) != metadata.get("sha256"):
            raise FormatError(f"{str(path)!r} is corrupt: its tensors do not match their SHA-256")
    elif INTEGRITY_KEY not in metadata:  # read_checkpoint checked it where present
        raise FormatError(f"{str(path)!r} is corrupt: a {found} file must carry "
                          f"{INTEGRITY_KEY!r}, it has none; write it with save_quantized")
    return tensors, metadata


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The quantized model stored at `path`, rebuilt on `model` (a float model of the same
    architecture, e.g. fresh from penjing.models.create; it is left unchanged). Any file
    that does not fit is a FormatError."""
    tensors, metadata = _read(path)
    try:
        config = config_from_dict(parse_json(metadata.get("config"), "the config"))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise FormatError(
            f"{str(path)!r} holds a quantization config penjing cannot read ({err}); write "
            "the file with save_quantized"
        ) from err
    try:
        return _rebuild(model, config, tensors, path)
    except FormatError:
        raise
    except (PenjingError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError, OverflowError) as err:
        raise FormatError(
            f"{str(path)!r} does not fit this {type(model).__name__} ({err}): it was saved from "
            "a different model or config; write it with save_quantized"
        ) from err


def _fitting(
    tensors: dict, key: str, shape: torch.Size, path: str | os.PathLike
) -> torch.Tensor:
    """`tensors[key]` if it is no larger than its weight (a scale or zero point: one per
    tensor, channel or group), so dequantizing cannot grow beyond the weight."""
    value = tensors.get(key)
    if value is None:
        raise FormatError(f"{str(path)!r} holds no {key!r}: it was saved from a different "
                          "model or config")
    if value.dim() > len(shape) or value.numel() > max(shape.numel(), 1):
        raise FormatError(f"{str(path)!r}: {key!r} of shape {tuple(value.shape)} is larger "
                          f"than its weight's {tuple(shape)}")
    return value


def _rebuild(
    model: nn.Module, config: QuantConfig, tensors: dict, path: str | os.PathLike
) -> nn.Module:
    # the quantize step's replay: prepare with learned scales off (they are stored baked)
    q = steps.get("quantize").replay(model, {"op": "quantize", "config": config_to_dict(
        config)}, tensors)
    load_state(q, restore_state(q, tensors, path), path)
    return q.eval()


def _zero_is_implied(quant: nn.Module) -> bool:
    """Whether a weight quantizer's zero points go without saying: a symmetric spec has
    all of them 0 (an INT4 model in groups of 32 spends as many bytes on them as on its
    scales)."""
    return quant.spec.symmetric and not bool(torch.any(quant.zero_point != 0))


def integer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state with every fake-quantized weight as its integers (keys ending in
    .int, or .int4 for two to a byte), as `save_quantized` stores it."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for key, quant in _integer_weights(model).items():
        ints = quantize(state.pop(key).float(), quant.scale.detach(), quant.zero_point,
                        quant.spec)
        if _zero_is_implied(quant):  # as many as the scales, every one 0: not stored
            state.pop(key.removesuffix("original") + "0.zero_point", None)
        if _fits_a_nibble(quant.spec):
            state[key + _NIBBLE_SUFFIX] = pack_nibbles(ints, quant.spec.qmin)
        else:
            state[key + _INT_SUFFIX] = ints.to(_storage_dtype(quant.spec))
    return state


def _check_range(ints: torch.Tensor, spec: QuantSpec, key: str, path) -> None:
    """A FormatError unless every stored integer lies in [qmin, qmax] of `spec`: a config
    whose bits were changed after saving (7 for 8) would otherwise load, and compute with
    integers its own quantizer could never have made."""
    if ints.numel() and (int(ints.min()) < spec.qmin or int(ints.max()) > spec.qmax):
        raise FormatError(
            f"{str(path)!r} is corrupt or forged: integer weight {key!r} holds values in "
            f"[{int(ints.min())}, {int(ints.max())}], outside [{spec.qmin}, {spec.qmax}] of "
            f"its config's {spec.bits}-bit {'signed' if spec.signed else 'unsigned'} "
            "integers; save the model again")


def _check_qparams(module: nn.Module, tensors: dict, prefix: str, path) -> None:
    """An activation quantizer's scales must be finite and positive, and its zero points
    integers in [qmin, qmax] of its config's bits."""
    scale, zero, spec = tensors[prefix + "scale"], tensors[prefix + "zero_point"], module.spec
    bad = None
    if not scale.is_floating_point() or not bool(torch.all(torch.isfinite(scale) & (scale > 0))):
        bad = "scales that are not finite positive numbers"
    elif zero.is_floating_point() or zero.is_complex() or zero.dtype == torch.bool:
        bad = f"zero points of type {zero.dtype}, not integers"
    elif zero.numel() and (int(zero.min()) < spec.qmin or int(zero.max()) > spec.qmax):
        bad = (f"zero points in [{int(zero.min())}, {int(zero.max())}], outside "
               f"[{spec.qmin}, {spec.qmax}] of its {spec.bits}-bit config")
    if bad:
        raise FormatError(f"{str(path)!r} is corrupt or forged: activation quantizer "
                          f"{prefix.rstrip('.')!r} has {bad}; save the model again")


def restore_state(q: nn.Module, tensors: dict, path: str | os.PathLike) -> dict:
    """Set the activation quantizers of `q` (a model `prepare` made) from `tensors` (as
    `integer_state` wrote them) and return the float state_dict that `q` then loads."""
    for name, module in q.named_modules():
        if isinstance(module, ActQuant):
            prefix = f"{name}."
            try:
                module.register_buffer("scale", tensors[prefix + "scale"])
                module.register_buffer("zero_point", tensors[prefix + "zero_point"])
            except KeyError as err:
                raise FormatError(
                    f"{str(path)!r} holds no {err} for activation quantizer {name!r}: it was "
                    "saved from a different model or config"
                ) from err
            module.frozen = True
            _check_qparams(module, tensors, prefix, path)
    state = {}
    integer = _integer_weights(q)
    shapes = {k: v.shape for k, v in q.state_dict().items()}
    for key, value in tensors.items():
        suffix = next((s for s in (_INT_SUFFIX, _NIBBLE_SUFFIX) if key.endswith(s)), None)
        if suffix is None:
            state[key] = value
            continue
        float_key = key.removesuffix(suffix)
        if float_key not in integer:
            raise FormatError(
                f"{str(path)!r}: integer weight {key!r} has no quantized layer in this "
                f"{type(q).__name__}: it was saved from a different model or config"
            )
        quant, shape = integer[float_key], shapes[float_key]
        if suffix == _NIBBLE_SUFFIX and not _fits_a_nibble(quant.spec):
            raise FormatError(
                f"{str(path)!r} is corrupt or forged: {key!r} holds two integers to a byte, "
                f"which only weights of 16 levels or fewer are stored as, but its config "
                f"says {quant.spec.bits} bits; save the model again")
        if suffix == _NIBBLE_SUFFIX:
            try:
                ints = unpack_nibbles(value, quant.spec.qmin, shape)
            except ValueError as err:
                raise FormatError(
                    f"{str(path)!r}: {key!r}: {err}: it was saved from a different model"
                ) from err
        elif value.shape != shape or value.is_floating_point() or value.is_complex():
            raise FormatError(f"{str(path)!r} does not fit this {type(q).__name__}: integer "
                              f"weight {key!r} is {value.dtype} of shape {tuple(value.shape)}, "
                              f"the layer needs integers of {tuple(shape)}")
        else:
            ints = value.to(torch.int32)
        _check_range(ints, quant.spec, key, path)
        base = float_key.removesuffix("original")
        scale = _fitting(tensors, base + "0.scale", shape, path)
        zero_key = base + "0.zero_point"
        if zero_key not in tensors and quant.spec.symmetric:  # implied: all 0
            zero = state[zero_key] = torch.zeros(scale.shape, dtype=torch.int32)
        else:
            zero = _fitting(tensors, zero_key, shape, path)
        state[float_key] = dequantize(ints, scale, zero, quant.spec)
        if state[float_key].shape != shape:
            raise FormatError(f"{str(path)!r}: the scales of {key!r} make a weight of shape "
                              f"{tuple(state[float_key].shape)}, the layer's is {tuple(shape)}")
    return state
