"""One entry for pruning: `prune_(model, config)`, where the config's type says what is
removed or zeroed and its fields say how much and where.

| config | what goes | kept by |
|---|---|---|
| `MagnitudeConfig` | single weights, smallest magnitude first | a mask |
| `NMConfig` | all but n of every m weights along the reduction dim | a mask |
| `PatternConfig` | groups of one shape (shape, kernel, stripe, vector, block) | a mask |
| `ChannelConfig` | coupled channels, removed for real | a smaller model |
| `HeadConfig` | attention heads, removed for real | a smaller model |

Every config is a frozen dataclass that checks itself when built, so a wrong value is one
error naming the field, in the same words from Python, a recipe and the command line.
`layers` chooses the layers everywhere in the same way: None (every layer the method
handles), a list of module names, or a `penjing.layers` filter such as
`~pj.layers.regex("fc3")`.

>>> pj.prune.prune_(model, pj.prune.MagnitudeConfig(sparsity=0.9))
>>> pj.prune.prune_(model, pj.prune.ChannelConfig(ratio=0.5, round_to=8), example_inputs=x)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from penjing.prune.heads import HEAD_CRITERIA, HeadAttention, heads_
from penjing.prune.masking.layerwise import SparseGPTConfig, WandaConfig, sparsegpt_, wanda_
from penjing.prune.masking.magnitude import check_sparsity, magnitude_
from penjing.prune.masking.nm import check_nm, nm_
from penjing.prune.masking.patterns import PATTERNS, pattern_
from penjing.prune.structural.criteria import CRITERIA
from penjing.prune.structural.structured import CHANNEL_STRUCTURES, channels_, check_ratio

# None: every layer the method handles; names; or a filter fn(module, name) -> bool
Layers = Sequence[str] | Callable[[nn.Module, str], bool] | None


def _check_layers(layers: Layers) -> None:
    if layers is None or callable(layers):
        return
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise TypeError(f"layers must be None, a list of module names or a penjing.layers "
                        f"filter, got {layers!r}")


def _check_choice(field: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")


def _names(layers: Layers) -> list[str] | Callable | None:
    """`layers` as the masking functions take them (a list, a filter or None)."""
    return list(layers) if layers is not None and not callable(layers) else layers


@dataclass(frozen=True)
class MagnitudeConfig:
    """Single weights by magnitude (Han et al.): give `sparsity` or `quality`."""

    # fraction of weights to zero, one for all layers or {layer name: fraction}
    sparsity: float | Mapping[str, float] | None = None
    # Han's threshold instead: prune |w| < quality · std(w), per layer
    quality: float | None = None
    # 'layer': each layer gets exactly its sparsity; 'global': one threshold over all
    scope: Literal["layer", "global"] = "layer"
    layers: Layers = None

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.quality is None):
            raise ValueError("give exactly one of sparsity (fraction of weights to zero) or "
                             "quality (Han's threshold in standard deviations)")
        if isinstance(self.sparsity, Mapping):
            for name, value in self.sparsity.items():
                check_sparsity(value, f"sparsity of {name!r}")
            if self.layers is not None:
                raise ValueError("give layers either as the keys of sparsity or as layers, "
                                 "not both")
        elif self.sparsity is not None:
            check_sparsity(self.sparsity)
        if self.quality is not None and (isinstance(self.quality, bool) or not isinstance(
                self.quality, int | float) or self.quality < 0):
            raise ValueError(f"quality must be a number >= 0 (standard deviations), got "
                             f"{self.quality!r}")
        _check_choice("scope", self.scope, ("layer", "global"))
        _check_layers(self.layers)


@dataclass(frozen=True)
class NMConfig:
    """N:M semi-structured sparsity: n of every m consecutive inputs kept (2:4 runs on
    NVIDIA's sparse tensor cores)."""

    n: int = 2
    m: int = 4
    layers: Layers = None

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        _check_layers(self.layers)


@dataclass(frozen=True)
class PatternConfig:
    """Groups of weights of one shape zeroed by their norm: 'shape' (one kernel position
    across input channels), 'kernel', 'stripe', 'vector' (4×1) or 'block' (2×2)."""

    pattern: str = "block"
    sparsity: float = 0.5  # fraction of the groups to zero
    layers: Layers = None

    def __post_init__(self) -> None:
        _check_choice("pattern", self.pattern, list(PATTERNS))
        check_sparsity(self.sparsity)
        _check_layers(self.layers)


@dataclass(frozen=True)
class ChannelConfig:
    """Coupled channels removed for real (penjing.prune.channels_): a smaller dense model.
    Needs `example_inputs` to trace the model."""

    ratio: float = 0.5  # fraction of each group's channels to remove
    # 'l1', 'l2', 'bn', 'random', or a callable (model, group) -> scores such as
    # penjing.prune.taylor(batches)
    criterion: str | Callable = "l1"
    # what the criterion reads: every coupled slice ('group'), the producing filters
    # ('filter'), the consumers' input channels ('channel'), Linear rows only ('neuron')
    structure: str = "group"
    global_ranking: bool = False  # rank all channels together instead of per group
    normalize: bool = True  # global ranking: scores over their group's mean
    round_to: int = 1  # kept counts a multiple of this (8, 16, 64 suit tensor cores)
    max_ratio: float = 0.9  # global ranking: no group loses more
    ratios: Mapping[str, float] | None = None  # per producing layer, per-group mode
    layers: Layers = None  # the layers whose channels may go; the others keep theirs

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_ratio(self.max_ratio, "max_ratio")
        if not callable(self.criterion):
            _check_choice("criterion", self.criterion, [*CRITERIA, "taylor"])
        _check_choice("structure", self.structure, list(CHANNEL_STRUCTURES))
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) \
                or self.round_to < 1:
            raise ValueError(f"round_to must be a positive int (1, 8, 16, 64), got "
                             f"{self.round_to!r}")
        for name, value in (self.ratios or {}).items():
            check_ratio(value, f"ratios[{name!r}]")
        _check_layers(self.layers)


@dataclass(frozen=True)
class HeadConfig:
    """Attention heads removed for real (penjing.prune.heads_), at least one per layer."""

    ratio: float = 0.5  # fraction of each layer's heads to remove
    criterion: str = "l1"  # 'l1' / 'l2' of each head's weights, or 'random'
    layers: Layers = None

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        _check_choice("criterion", self.criterion, HEAD_CRITERIA)
        _check_layers(self.layers)


PruneConfig = (MagnitudeConfig | NMConfig | PatternConfig | ChannelConfig | HeadConfig
               | SparseGPTConfig | WandaConfig)
CONFIGS: tuple[type, ...] = (MagnitudeConfig, NMConfig, PatternConfig, ChannelConfig, HeadConfig,
                             SparseGPTConfig, WandaConfig)

# what the command line and recipes call each kind of pruning: the one vocabulary
STRUCTURES: dict[str, type] = {
    "weight": MagnitudeConfig,
    "nm": NMConfig,
    **dict.fromkeys(PATTERNS, PatternConfig),
    **dict.fromkeys(CHANNEL_STRUCTURES, ChannelConfig),
    "head": HeadConfig,
}


def config_for(structure: str, **fields: Any) -> PruneConfig:
    """The config for a structure as the CLI and recipes name it ('weight', 'nm', a
    pattern, a channel granularity, 'head'), with `fields` (fields of other kinds are an
    error naming the ones that apply)."""
    _check_choice("structure", structure, list(STRUCTURES))
    cls = STRUCTURES[structure]
    if cls is PatternConfig:
        fields = {"pattern": structure, **fields}
    elif cls is ChannelConfig:
        fields = {"structure": structure, **fields}
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
        if key not in allowed:
            raise ValueError(f"{key} does not apply to {structure} pruning; its options: "
                             f"{', '.join(allowed)}")
    return cls(**fields)


def by_method(config: MagnitudeConfig | NMConfig, method: str) -> PruneConfig:
    """`config`'s amount and layers, pruned by `method`: 'magnitude' (the config itself),
    'sparsegpt' or 'wanda' (measured on calibration data, one sparsity for every layer)."""
    _check_choice("method", method, ("magnitude", "sparsegpt", "wanda"))
    if method == "magnitude":
        return config
    cls = SparseGPTConfig if method == "sparsegpt" else WandaConfig
    if isinstance(config, NMConfig):
        return cls(n=config.n, m=config.m, layers=config.layers)
    if not isinstance(config, MagnitudeConfig):
        raise ValueError(f"{method} prunes single weights or N:M, not {type(config).__name__}")
    if config.quality is not None or isinstance(config.sparsity, Mapping) \
            or config.scope != "layer":
        raise ValueError(f"{method} takes one sparsity for every layer, layer by layer; "
                         "quality, per-layer sparsity and scope are magnitude's")
    return cls(sparsity=config.sparsity, layers=config.layers)


def _ignored(model: nn.Module, layers: Layers) -> Callable | Sequence:
    """channels_' ignored_layers from a choice of the layers that may lose channels."""
    if layers is None:
        return ()
    if callable(layers):
        return lambda m, n: not layers(m, n)
    chosen = set(layers)
    unknown = sorted(chosen - {n for n, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"no layer named {unknown[0]!r} in {type(model).__name__}; give names "
                         "from model.named_modules()")
    return lambda m, n: n not in chosen


def prune_(model: nn.Module, config: PruneConfig, example_inputs: Any = None, *,
           calib: Iterable | None = None) -> Any:
    """Prune `model` in place as `config` says; return what each method returns (the
    sparsity per layer, the layers masked, the channel changes, the heads kept).

    `calib` (batches of real inputs) is what SparseGPT and Wanda measure each layer on;
    channel pruning traces the model on `example_inputs`.

    >>> pj.prune.prune_(model, pj.prune.NMConfig(2, 4))
    >>> pj.prune.prune_(llm, pj.prune.SparseGPTConfig(n=2, m=4), calib=text_batches)
    """
    if isinstance(config, SparseGPTConfig | WandaConfig):
        if calib is None:
            raise ValueError(f"{type(config).__name__} measures every layer on calibration "
                             "data: prune_(model, config, calib=batches) with a few dozen "
                             "sequences of real inputs")
        run = sparsegpt_ if isinstance(config, SparseGPTConfig) else wanda_
        return run(model, calib, config)
    if isinstance(config, MagnitudeConfig):
        if isinstance(config.sparsity, Mapping):
            return magnitude_(model, dict(config.sparsity), scope=config.scope)
        return magnitude_(model, config.sparsity, quality=config.quality, scope=config.scope,
                          layers=_names(config.layers))
    if isinstance(config, NMConfig):
        return nm_(model, config.n, config.m, _names(config.layers))
    if isinstance(config, PatternConfig):
        return pattern_(model, config.pattern, config.sparsity, _names(config.layers))
    if isinstance(config, HeadConfig):
        layers = config.layers
        if callable(layers):
            layers = [n for n, m in model.named_modules()
                      if n and isinstance(m, nn.MultiheadAttention | HeadAttention)
                      and layers(m, n)]
        return heads_(model, config.ratio, criterion=config.criterion,
                      layers=None if layers is None else list(layers))
    if isinstance(config, ChannelConfig):
        if example_inputs is None:
            raise ValueError("channel pruning traces the model: pass example_inputs (one "
                             "batch of inputs, e.g. torch.zeros(1, 3, 224, 224))")
        if config.criterion == "taylor":
            raise ValueError("criterion 'taylor' needs data: give criterion="
                             "penjing.prune.taylor(batches) with a few (x, y) batches")
        return channels_(
            model, example_inputs, ratio=config.ratio, criterion=config.criterion,
            structure=config.structure, global_ranking=config.global_ranking,
            round_to=config.round_to, ignored_layers=_ignored(model, config.layers),
            ratios=config.ratios, max_ratio=config.max_ratio, normalize=config.normalize,
        )
    raise TypeError(f"prune_ takes one of {', '.join(c.__name__ for c in CONFIGS)}, got "
                    f"{type(config).__name__}")

