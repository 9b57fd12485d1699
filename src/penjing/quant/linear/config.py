"""What to quantize: a small frozen config, presets, and the choice of layers by type and name."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from torch import nn

from penjing.errors import UnsupportedLayerError
from penjing.quant.linear.observers import OBSERVERS
from penjing.quant.linear.primitives import PerChannel, PerGroup, PerTensor, QuantSpec

# nn.MultiheadAttention: its projection weights only (its activations stay float inside)
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
# lookup tables: weights only (their input is integer ids), chosen with weight_only(embeddings=True)
EMBEDDINGS = (nn.Embedding,)


@dataclass(frozen=True)
class QuantConfig:
    """Weights and activations of which layers, at which precision, calibrated how.

    `layers` is an ordered map {regex: False | True | QuantSpec} over module names
    (fullmatch): the first matching pattern wins; False leaves a layer in float, a
    QuantSpec replaces the weight spec for that layer (e.g. 8-bit first layer in INT4).
    `first` / `last` say whether the first and last quantizable layers (in forward order)
    are quantized. Accumulators are assumed 32-bit, as in every integer kernel we export to.
    """

    # int8 symmetric per output channel: the weight format integer kernels take
    weight: QuantSpec | None = field(
        default_factory=lambda: QuantSpec(8, symmetric=True, signed=True, granularity=PerChannel(0))
    )
    # uint8 asymmetric per tensor: ONNX Runtime's fast x86 path (u8 activations × s8 weights)
    activation: QuantSpec | None = field(
        default_factory=lambda: QuantSpec(8, symmetric=False, signed=False, granularity=PerTensor())
    )
    observer: str | Callable = "minmax"  # activations: see penjing.quant.linear.observers.OBSERVERS
    weight_range: str | Callable = "minmax"  # weights: 'minmax' or 'mse'
    types: tuple[type[nn.Module], ...] = QUANTIZABLE
    layers: Mapping[str, bool | QuantSpec] = field(default_factory=dict)
    first: bool = True
    last: bool = True
    learnable: bool = False  # QAT: learn scales with LSQ instead of tracking min/max
    # only layers this accepts (penjing.layers: names, regex, types); after first / last
    filter_fn: Callable[[nn.Module, str], bool] | None = None

    def __post_init__(self) -> None:
        if self.weight is None and self.activation is None:
            raise ValueError("a QuantConfig needs a weight spec, an activation spec, or both")
        lookups = [t.__name__ for t in self.types if issubclass(t, EMBEDDINGS)]
        if lookups and self.activation is not None:
            raise ValueError(
                f"types include {lookups}, whose input is integer ids, not an activation to "
                "quantize; quantize embeddings with weights only: "
                "pj.quant.weight_only(bits, group_size, embeddings=True)"
            )
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        for pattern, value in self.layers.items():
            if not isinstance(value, bool | QuantSpec):
                raise TypeError(
                    f"layers[{pattern!r}] must be True, False or a QuantSpec, got {value!r}"
                )
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"layers pattern {pattern!r} is not a regular expression ({err}); give "
                    "a Python regex matched in full against module names, e.g. 'fc.*'"
                ) from err


def int8(
    per_channel: bool = True,
    observer: str | Callable = "minmax",
    reduce_range: bool = False,
    **kwargs,
) -> QuantConfig:
    """INT8 weights (symmetric, per channel or per tensor) and uint8 activations.

    `reduce_range=True` keeps weights in [-64, 63] (stored as int8): x86 CPUs without
    VNNI multiply u8 × s8 pairs into int16 with saturation, which full-range weights can
    overflow; see `penjing.export.cpu_saturates_int8()`.
    """
    granularity = PerChannel(0) if per_channel else PerTensor()
    bits = 7 if reduce_range else 8
    return QuantConfig(weight=QuantSpec(bits, True, True, granularity), observer=observer, **kwargs)


def weight_only(
    bits: int = 8, group_size: int | None = None, *, embeddings: bool = False, **kwargs
) -> QuantConfig:
    """Weights only, symmetric, per channel or in groups of `group_size` (32/64/128).

    `embeddings=True` quantizes nn.Embedding tables too, per row (one token's vector) or
    in groups along it: in a small transformer the word table is half the weights.

    >>> pj.quant.quantize_(bert, pj.quant.weight_only(4, 32, embeddings=True))
    """
    granularity = PerChannel(0) if group_size is None else PerGroup(group_size)
    if embeddings:
        types = tuple(kwargs.pop("types", QUANTIZABLE))
        kwargs["types"] = types + tuple(t for t in EMBEDDINGS if t not in types)
    return QuantConfig(weight=QuantSpec(bits, True, True, granularity), activation=None, **kwargs)


def select(
    model: nn.Module, config: QuantConfig, order: list[str] | None = None
) -> dict[str, QuantSpec | None]:
    """{layer name: weight spec (None = activations only)} for the layers `config` picks.

    `order` lists module names in forward order (from a trace) for `first` / `last`;
    without it the registration order is used.
    """
    modules = dict(model.named_modules())
    attention = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    candidates = [  # nn.MultiheadAttention quantizes its own out_proj
        n for n, m in modules.items()
        if n and isinstance(m, config.types)
        and not any(n.startswith(f"{a}.") for a in attention if a)
    ]
    for pattern in config.layers:
        regex = re.compile(pattern)
        hits = [n for n in modules if n and regex.fullmatch(n)]
        if not hits:
            raise ValueError(
                f"layers pattern {pattern!r} matches no module; quantizable layers: {candidates}"
            )
        for name in hits:
            if config.layers[pattern] is not False and not isinstance(modules[name], config.types):
                raise UnsupportedLayerError(
                    f"layer {name!r} is a {type(modules[name]).__name__}, which linear "
                    f"quantization does not handle; quantizable types: "
                    f"{[t.__name__ for t in config.types]}"
                )
    if order is not None:  # layers inside a leaf (e.g. attention's out_proj) are not called
        candidates = [n for n in order if n in candidates]
    chosen: dict[str, QuantSpec | None] = {}
    for i, name in enumerate(candidates):
        if (i == 0 and not config.first) or (i == len(candidates) - 1 and not config.last):
            continue
        spec: bool | QuantSpec = True
        for pattern, value in config.layers.items():
            if re.fullmatch(pattern, name):
                spec = value
                break
        if spec is False or (config.filter_fn is not None
                             and not config.filter_fn(modules[name], name)):
            continue
        chosen[name] = spec if isinstance(spec, QuantSpec) else config.weight
    if not chosen:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no layer to quantize with this config "
            f"(types {[t.__name__ for t in config.types]}, layers {dict(config.layers)})"
        )
    return chosen


CLI_GRANULARITIES = ("channel", "tensor", "group")


def make_config(
    bits: int = 8,
    granularity: str = "channel",
    group_size: int | None = None,
    observer: str = "minmax",
    weight_range: str = "minmax",
    act_bits: int | None = 8,
    skip: Sequence[str] = (),
    skip_first: bool = False,
    skip_last: bool = False,
    layers: Mapping[str, bool] | None = None,
    reduce_range: bool = False,
    learnable: bool = False,
) -> QuantConfig:
    """The QuantConfig the command line and a recipe's quantize stage describe: symmetric
    signed weights at `bits` (7 with `reduce_range`, for x86 CPUs without VNNI),
    asymmetric unsigned activations at `act_bits` (None: weights only); `skip` regexes
    and then the ordered `layers` map {regex: quantize?} choose the layers."""
    if granularity not in CLI_GRANULARITIES:
        raise ValueError(f"granularity must be one of {CLI_GRANULARITIES}, got {granularity!r}")
    if (granularity == "group") != (group_size is not None):
        raise ValueError(
            "group_size goes with granularity 'group' and only with it (e.g. group 32, 64 "
            f"or 128); got granularity {granularity!r}, group_size {group_size!r}"
        )
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {sorted(OBSERVERS)}")
    g = {"channel": PerChannel(0), "tensor": PerTensor()}.get(granularity) or PerGroup(group_size)
    if reduce_range and bits != 8:
        raise ValueError(f"reduce_range keeps 8-bit weights in 7 bits; it goes with bits 8, "
                         f"got bits {bits}")
    activation = None if act_bits is None else QuantSpec(act_bits, False, False, PerTensor())
    return QuantConfig(
        weight=QuantSpec(7 if reduce_range else bits, True, True, g),
        activation=activation,
        observer=observer,
        weight_range=weight_range,
        layers={pattern: False for pattern in skip} | dict(layers or {}),
        first=not skip_first,
        last=not skip_last,
        learnable=learnable,
    )


def resolve_filter(config: QuantConfig, model: nn.Module) -> QuantConfig:
    """`config` with its filter_fn folded into `layers` as exact-name exclusions for
    `model`, so that it can be stored as JSON and replayed (a function cannot be)."""
    if config.filter_fn is None:
        return config
    dropped = {re.escape(n): False for n, m in model.named_modules()
               if n and isinstance(m, config.types) and not config.filter_fn(m, n)}
    return replace(config, filter_fn=None, layers={**dropped, **config.layers})
