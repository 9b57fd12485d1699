"""Structured pruning that physically removes channels: trace → group → score → select → cut.

    small = pj.prune.channels(model, example_inputs=x, ratio=0.5, criterion="l1")

The result is an ordinary, smaller dense nn.Module: for the channels kept it computes
exactly what the original computed, so it is faster on every runtime. `channels_` does the
same in place and returns the replayable list of changes (see `penjing.prune.structural.surgery`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from penjing.core import history
from penjing.core.counting import count_macs
from penjing.core.modes import eval_mode
from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.prune.structural.criteria import Criterion, resolve, shared_sums
from penjing.prune.structural.explain import pinned
from penjing.prune.structural.graph import DependencyGraph, dependency_graph
from penjing.prune.structural.groups import Group
from penjing.prune.structural.surgery import Change, apply_, plan

# The channel structures: which slices of a group a criterion reads. Each removes the same
# thing (a channel and everything coupled to it); they differ in what decides which go.
CHANNEL_STRUCTURES: dict[str, tuple[str, ...] | None] = {
    "group": None,  # every coupled slice: filters, BN entries and all consumers' inputs
    "filter": ("out", "dw", "norm"),  # the producing layers' filters (Li et al., ICLR'17)
    "channel": ("in", "dw", "norm"),  # the input channels of the layers that read them
    "neuron": ("out", "norm"),  # rows of Linear layers; groups made by convs are kept
}


def groups(model: nn.Module, example_inputs: Any) -> list[Group]:
    """Every group of coupled channels in `model` that could be pruned."""
    return dependency_graph(model, example_inputs).groups()


def check_ratio(ratio: float, what: str = "ratio") -> None:
    """A ValueError unless `ratio` is a fraction of channels to remove, in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ValueError(f"{what} must be a fraction of channels to remove in [0, 1), got "
                         f"{ratio!r}; 0.5 removes half the channels of every group")


def _rounded_keep(n: int, keep: int, round_to: int) -> int:
    """Kept count rounded up to a multiple of `round_to` (never more than the group has)."""
    keep = max(1, keep)
    if round_to > 1:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return min(n, keep)


def _is_ignored(fqn: str, ignored: list[str]) -> bool:
    return any(fqn == i or fqn.startswith(i + ".") or i == "" for i in ignored)


def select(
    scored: list[tuple[Group, torch.Tensor]],
    ratio: float,
    *,
    global_ranking: bool = False,
    round_to: int = 1,
    ratios: Mapping[str, float] | None = None,
    max_ratio: float = 0.9,
    normalize: bool = True,
) -> list[int]:
    """The channel ids to remove from each scored group.

    Per-group: the lowest-scoring `ratio` of each group (or `ratios[fqn]` for a group one of
    whose producer layers is named there). Global: scores are divided by their group's mean
    (unless `normalize=False`) so layers of different scale compare, the lowest `ratio` of
    all channels go, and no group loses more than `max_ratio`. Kept counts are then rounded
    up to `round_to`.
    """
    ratios = dict(ratios or {})
    if global_ranking and ratios:
        raise ValueError("ratios= gives per-layer ratios, which global ranking does not use; "
                         "drop ratios= or set global_ranking=False")
    makers = {f for group, _ in scored for f in group.producers}
    if set(ratios) - makers:
        raise ValueError(f"ratios names {sorted(set(ratios) - makers)}, which make no prunable "
                         "channels (a typo, an ignored layer, or outputs that stay); layers "
                         f"that do: {sorted(makers)}")
    counts: dict[int, int] = {}
    if global_ranking:
        pool = []
        for gi, (_, scores) in enumerate(scored):
            norm = scores / scores.mean().clamp_min(1e-12) if normalize else scores
            pool += [(float(v), gi) for v in norm]
        budget = int(ratio * len(pool))
        caps = [int(max_ratio * len(g)) for g, _ in scored]
        counts = dict.fromkeys(range(len(scored)), 0)
        for _, gi in sorted(pool, key=lambda t: t[0]):
            if budget == 0:
                break
            if counts[gi] < caps[gi]:
                counts[gi] += 1
                budget -= 1
    else:
        for gi, (group, _) in enumerate(scored):
            named = [ratios[f] for f in group.producers if f in ratios]
            if len(set(named)) > 1:
                raise ValueError(f"ratios gives different values {named} to coupled layers "
                                 f"{group.producers}; give them one ratio")
            r = named[0] if named else ratio
            check_ratio(r, f"ratio for {group.producers}")
            counts[gi] = int(r * len(group))
    removed = []
    for gi, (group, scores) in enumerate(scored):
        n = len(group)
        drop = n - _rounded_keep(n, n - counts[gi], round_to) if counts[gi] else 0
        if drop > 0:
            order = torch.argsort(scores, stable=True)[:drop]
            removed += [group.channels[int(i)] for i in order]
    return removed


def _ignored_names(model: nn.Module, ignored_layers) -> list[str]:
    """Names from `ignored_layers`: names, modules, or a filter fn(module, name)."""
    if callable(ignored_layers):
        return [n for n, m in model.named_modules() if n and ignored_layers(m, n)]
    names = {m: n for n, m in model.named_modules()}
    known = set(names.values())
    ignored = []
    for item in ignored_layers:
        name = names.get(item) if isinstance(item, nn.Module) else item
        if name is None or name not in known:
            raise ValueError(f"ignored layer {item!r} is not a module of "
                             f"{type(model).__name__}; give a name from model.named_modules()")
        ignored.append(name)
    return ignored


def score_groups(
    model: nn.Module,
    graph: DependencyGraph,
    criterion: str | Criterion = "l1",
    *,
    structure: str = "group",
    ignored_layers: Iterable[str | nn.Module] = (),
) -> list[tuple[Group, torch.Tensor]]:
    """Each prunable group with one score per channel; ignored and unscorable groups left out.

    A group is left out when a layer in `ignored_layers` makes its channels or normalizes
    them (its inputs may still shrink), or when the criterion returns None for it.
    """
    if structure not in CHANNEL_STRUCTURES:
        raise ValueError(f"structure must be one of {list(CHANNEL_STRUCTURES)} for channel "
                         f"pruning, got {structure!r}")
    score = resolve(criterion)
    ignored = _ignored_names(model, ignored_layers)
    prepare = getattr(score, "prepare", None)
    if callable(prepare):
        prepare(model)
    roles = CHANNEL_STRUCTURES[structure]
    with shared_sums():
        return _scored(model, graph, score, ignored, roles, structure)


def _scored(model: nn.Module, graph: DependencyGraph, score: Criterion, ignored: list[str],
            roles: tuple[str, ...] | None, structure: str) -> list[tuple[Group, torch.Tensor]]:
    scored = []
    for group in graph.groups():
        owners = [s.fqn for s in group.slices if s.role in ("out", "dw", "norm")]
        if any(_is_ignored(f, ignored) for f in owners):
            continue
        if structure == "neuron" and not all(
            isinstance(model.get_submodule(f), nn.Linear) for f in group.producers
        ):
            continue
        scores = score(model, group if roles is None else group.only(roles))
        if scores is None:
            continue
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
        if scores.shape != (len(group),):
            raise ValueError(f"criterion returned scores of shape {tuple(scores.shape)} for a "
                             f"group of {len(group)} channels; return one score per channel")
        scored.append((group, scores))
    return scored


def _check_options(round_to: int, max_ratio: float) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int (1, 8, 16, 64), got {round_to!r}")
    check_ratio(max_ratio, "max_ratio")


def channels_(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float = 0.5,
    criterion: str | Criterion = "l1",
    structure: str = "group",
    global_ranking: bool = False,
    round_to: int = 1,
    ignored_layers: Iterable[str | nn.Module] = (),
    ratios: Mapping[str, float] | None = None,
    max_ratio: float = 0.9,
    normalize: bool = True,
) -> list[Change]:
    """Remove `ratio` of the channels of every prunable group of `model`, in place.

    `criterion`: "l1", "l2", "bn", "random", `penjing.prune.taylor(batches)` or any
    `(model, group) -> scores` callable. `structure` says what the criterion reads (see
    CHANNEL_STRUCTURES): "group" (default) every coupled slice, "filter" the producers' filters,
    "channel" the consumers' input channels, "neuron" Linear rows only. `ignored_layers`
    (module names or modules) keep their output channels. `global_ranking` ranks all
    channels together instead of `ratio` per group (`ratios` maps producer layer names to
    their own ratio in per-group mode). `round_to` rounds every kept count up to a multiple
    (8, 16, 64 suit tensor cores). Returns the changes, which `penjing.prune.apply_` replays.
    """
    check_ratio(ratio)
    _check_options(round_to, max_ratio)
    graph = dependency_graph(model, example_inputs)
    scored = score_groups(model, graph, criterion, structure=structure,
                          ignored_layers=ignored_layers)
    removed = select(scored, ratio, global_ranking=global_ranking, round_to=round_to,
                     ratios=ratios, max_ratio=max_ratio, normalize=normalize)
    if not removed and (ratio > 0 or any(ratios.values() if ratios else ())):
        _warn_nothing_removed(graph, len(scored))
    changes = plan(graph, removed)
    _apply_checked_(model, changes, example_inputs)
    return changes


def _apply_checked_(model: nn.Module, changes: list[Change], example_inputs: Any) -> None:
    """Cut `changes` out of `model`, then run it once on `example_inputs`. A model that no
    longer runs (a layer of the user's own reads a per-channel tensor penjing did not
    slice) is put back as it was and refused with the error, never returned broken."""
    touched = {c.fqn: model.get_submodule(c.fqn) for c in changes}
    saved = {fqn: (dict(m._parameters), dict(m._buffers), dict(vars(m)))
             for fqn, m in touched.items()}
    recorded = history.steps(model)
    apply_(model, changes)
    inputs = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    try:
        _run_once(model, inputs)
    except Exception as err:
        for fqn, (parameters, buffers, attributes) in saved.items():
            module = touched[fqn]
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            module.__dict__.update({k: v for k, v in attributes.items()
                                    if k not in ("_parameters", "_buffers", "_modules")})
        model.__dict__[history._ATTR] = recorded  # the "channels" step apply_ added goes
        raise UnsupportedLayerError(
            f"the model with its channels removed fails its first forward pass "
            f"({type(err).__name__}: {str(err).strip()[:300]}), so it is left as it was. A layer "
            "probably reads a per-channel tensor that was not cut with its channels: keep that "
            "layer whole with ignored_layers=[...] (--skip), or give it a rule with "
            "penjing.prune.register_op") from err


def _run_once(model: nn.Module, inputs: tuple) -> None:
    """Run `model` once on `inputs` in eval mode under no_grad; raises what the run raises.

    A copy of the model on the meta device is run first: it checks every shape without
    the arithmetic (a forward pass of a large model takes seconds on a CPU), and leaves the
    model itself untouched. A model that does not run there (an op without a meta kernel,
    a tensor made on the CPU in forward, Python that reads tensor values) is run for real,
    and so is one with forward hooks, which may belong to objects a copy should not copy.
    """
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
        return
    meta = {id(t): nn.Parameter(t.detach().to("meta"), t.requires_grad)
            if isinstance(t, nn.Parameter) else t.to("meta")
            for t in [*model.parameters(), *model.buffers()]}
    recorded = model.__dict__.get(history._ATTR)
    meta[id(recorded)] = recorded  # the copy runs once: it need not copy the history
    try:
        copied = copy.deepcopy(model, meta)
        with torch.no_grad(), eval_mode(copied):
            copied(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs))
        return
    except Exception:  # noqa: BLE001 - any failure on meta: the real run below decides
        pass
    with torch.no_grad(), eval_mode(model):
        model(*inputs)


def _warn_nothing_removed(graph: DependencyGraph, scored: int) -> None:
    """Say why a call that was asked to prune removes nothing: which layers' channels stay,
    and the op that keeps each."""
    stay = pinned(graph)
    found = len(graph.groups())
    if scored:
        why = (f"{scored} group(s) were scored but each is too small to lose a channel at "
               "this ratio (raise the ratio, or lower round_to)")
    elif found:
        why = (f"all {found} group(s) are made by ignored layers or the criterion could not "
               "score them")
    else:
        why = "no group of channels can be removed"
    detail = "; ".join(str(p) for p in stay[:4])
    more = f" (and {len(stay) - 4} more layers)" if len(stay) > 4 else ""
    warnings.warn(f"channel pruning removed nothing: {why}. "
                  + (f"Channels that stay: {detail}{more}. " if stay else "")
                  + "penjing.prune.explain(model, example_inputs) lists every group and why "
                  "each channel stays", PenjingWarning, stacklevel=3)


def _for_copy(model: nn.Module, kwargs: dict) -> dict:
    """Options with layer modules of `model` replaced by their names (valid in a copy)."""
    if "ignored_layers" in kwargs and not callable(kwargs["ignored_layers"]):
        names = {m: n for n, m in model.named_modules()}
        kwargs = {**kwargs, "ignored_layers": [names.get(i, i) if isinstance(i, nn.Module)
                                               else i for i in kwargs["ignored_layers"]]}
    return kwargs


def channels(model: nn.Module, example_inputs: Any, **kwargs) -> nn.Module:
    """A pruned copy of `model` (the original is left untouched); options as in `channels_`."""
    kwargs = _for_copy(model, kwargs)
    pruned = copy.deepcopy(model)
    channels_(pruned, example_inputs, **kwargs)
    return pruned


def ratio_for_macs(model: nn.Module, example_inputs: Any, macs: float, **kwargs) -> float:
    """The smallest channel ratio whose pruned model keeps at most `macs` of the MACs.

    `macs` is the fraction of multiply-accumulates to keep, in (0, 1]; 0.5 removes half.
    Options as in `channels_`; the graph is built and scored once, then a bisection prunes
    copies until it brackets the budget to within one channel in the largest group.
    """
    if isinstance(macs, bool) or not isinstance(macs, int | float) or not 0 < macs <= 1:
        raise ValueError(f"macs must be the fraction of MACs to keep in (0, 1], got {macs!r}")
    kwargs = _for_copy(model, kwargs)
    _check_options(kwargs.get("round_to", 1), kwargs.get("max_ratio", 0.9))
    score_options = {k: kwargs.pop(k) for k in ("criterion", "structure", "ignored_layers")
                     if k in kwargs}
    graph = dependency_graph(model, example_inputs)
    scored = score_groups(model, graph, **score_options)
    full = count_macs(model, example_inputs)

    def kept(ratio: float) -> float:
        if ratio == 0:
            return 1.0
        small = copy.deepcopy(model)
        apply_(small, plan(graph, select(scored, ratio, **kwargs)))
        return count_macs(small, example_inputs) / full

    low, high = 0.0, 0.99
    if kept(high) > macs:
        raise ValueError(f"even removing 99 % of the channels keeps more than {macs} of the "
                         "MACs (pinned or ignored layers carry the rest); ask for a larger "
                         "macs fraction")
    steps = max(2, math.ceil(math.log2(max((len(g) for g, _ in scored), default=2))) + 2)
    for _ in range(steps):
        mid = (low + high) / 2
        if kept(mid) <= macs:
            high = mid
        else:
            low = mid
    return high
