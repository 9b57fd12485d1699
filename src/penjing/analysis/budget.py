"""Per-layer pruning ratios and bit widths chosen from sensitivity curves under a budget.

Each layer's curve says what pruning it (or quantizing it) alone costs in the metric.
Treating those costs as additive, the cheapest way to remove a given amount is a
fractional knapsack over the lower convex hull of each curve: take hull segments in
order of metric lost per weight (or MAC, or byte) saved, across all layers, until the
budget is met, the last segment only partly. Sensitive layers keep more; robust ones
(the large fully-connected layers, usually) give up most. A budget on file bytes plans
sparsity and bits together (the Deep Compression pipeline's two knobs).

    >>> table = sensitivity(model, evaluate, ratios=[0.5, 0.8, 0.9, 0.95])
    >>> plan = plan_budget(table, Budget(sparsity=0.9))
    >>> print(plan); plan.apply_(model)          # magnitude pruning at the planned ratios
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from penjing.analysis.sensitivity import SensitivityTable
from penjing.errors import PenjingError
from penjing.prune.masking.magnitude import magnitude_
from penjing.prune.schedule import agp, iterative
from penjing.quant.sharing.shared import kmeans_

CODEBOOK_ENTRY_BYTES = 4  # a float32 codebook value in the .pjz file


class BudgetError(PenjingError, ValueError):
    """No plan within the sensitivity table's points meets the budget."""


@dataclass(frozen=True)
class Budget:
    """What the plan must meet; give exactly one.

    sparsity: fraction of the planned layers' weights pruned, in [0, 1).
    params: non-zero weights left in the planned layers.
    macs: non-zero multiply-accumulates left in the planned layers (needs table.macs).
    bytes: estimated coded bytes of the planned layers' weights (needs a bits table).
    max_drop: the largest predicted metric drop (sum over layers of the single-layer
        drops); the plan prunes as much as that allows.
    """

    sparsity: float | None = None
    params: int | None = None
    macs: int | None = None
    bytes: int | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.__dict__.items() if v is not None}
        if len(given) != 1:
            raise ValueError(
                "give exactly one of sparsity=, params=, macs=, bytes=, max_drop=; got "
                f"{sorted(given) or 'none'}"
            )
        (key, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"budget {key} must be a number, got {value!r}")
        if key == "sparsity" and not 0.0 <= value < 1.0:
            raise ValueError(f"budget sparsity must be in [0, 1), got {value}")
        if value < 0:
            raise ValueError(f"budget {key} must be >= 0, got {value}")

    @property
    def kind(self) -> str:
        return next(k for k, v in self.__dict__.items() if v is not None)


@dataclass(frozen=True)
class LayerChoice:
    """What the plan does to one layer, and what the curves predict it costs."""

    sparsity: float
    pruned: int  # weights pruned, exactly round(sparsity * weights)
    weights: int
    bits: int | None = None
    predicted_drop: float = 0.0
    estimated_bytes: float | None = None


@dataclass
class Plan:
    """Per-layer choices meeting a budget."""

    layers: dict[str, LayerChoice]
    budget: Budget
    predicted_drop: float
    metric: str = "accuracy"
    notes: list[str] = field(default_factory=list)

    @property
    def sparsities(self) -> dict[str, float]:
        return {name: c.sparsity for name, c in self.layers.items()}

    @property
    def bits(self) -> dict[str, int]:
        return {name: c.bits for name, c in self.layers.items() if c.bits is not None}

    @property
    def sparsity(self) -> float:
        """Fraction of the planned layers' weights pruned."""
        total = sum(c.weights for c in self.layers.values())
        return sum(c.pruned for c in self.layers.values()) / total if total else 0.0

    def format(self) -> str:
        head = f"{'layer':<28} {'weights':>9} {'sparsity':>9} {'kept':>9} {'bits':>5} " \
               f"{'pred. drop':>10}"
        rows = [f"plan for {self.budget.kind} = {getattr(self.budget, self.budget.kind)}",
                head, "-" * len(head)]
        for name, c in self.layers.items():
            bits = "-" if c.bits is None else str(c.bits)
            rows.append(f"{name[-28:]:<28} {c.weights:>9,} {c.sparsity:>9.2%} "
                        f"{c.weights - c.pruned:>9,} {bits:>5} {c.predicted_drop:>10.4f}")
        rows.append("-" * len(head))
        rows.append(f"total sparsity {self.sparsity:.2%}; predicted {self.metric} drop "
                    f"{self.predicted_drop:.4f} (single-layer drops added, before fine-tuning)")
        return "\n".join(rows + self.notes)

    def __str__(self) -> str:
        return self.format()

    def iterative(self, rounds: int) -> list[dict[str, float]]:
        """Per-layer sparsities for `rounds` prune → fine-tune rounds ending at the plan
        (each round removes the same share of each layer's surviving weights)."""
        steps = {name: iterative(c.sparsity, rounds) for name, c in self.layers.items()}
        return [{name: s[i] for name, s in steps.items()} for i in range(rounds)]

    def agp(self, step: int, steps: int, start: int = 0) -> dict[str, float]:
        """Per-layer sparsities at training step `step` of Zhu & Gupta's gradual schedule
        reaching the plan after `steps` steps from `start`: call magnitude_ with them every
        few steps from the training loop."""
        return {name: min(c.sparsity, agp(step, c.sparsity, steps, start=start))
                for name, c in self.layers.items()}

    def apply_(self, model: nn.Module, *, init: str = "linear") -> dict[str, float]:
        """Prune the model in place to the planned ratios (magnitude, per layer), then share
        weights at the planned bits if any; returns the sparsities reached."""
        reached = magnitude_(model, self.sparsities)
        if self.bits:
            kmeans_(model, self.bits, init=init)
        return reached


# ---- curves --------------------------------------------------------------------------


def _curve(table: SensitivityTable, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(ratios, drops) from ratio 0, drops made non-decreasing and non-negative: pruning
    more never helps in the plan's model, and noise above the baseline is no gain."""
    ratios = np.array([0.0, *table.points])
    drops = np.array([0.0, *table.drop(layer)])
    order = np.argsort(ratios, kind="stable")
    ratios, drops = ratios[order], np.maximum.accumulate(np.maximum(drops[order], 0.0))
    keep = np.concatenate([[True], np.diff(ratios) > 0])
    return ratios[keep], drops[keep]


def _lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _interp(ratios: np.ndarray, drops: np.ndarray, r: float) -> float:
    return float(np.interp(r, ratios, drops))


def plan_budget(
    table: SensitivityTable,
    budget: Budget,
    *,
    bits: SensitivityTable | None = None,
    max_sparsity: float | None = None,
) -> Plan:
    """Choose per-layer ratios (and bits, for a bytes budget) that meet `budget`.

    `table` is a pruning sweep (axis "sparsity", structure "weight" or "nm"); `bits` a
    quantization sweep of the same layers, needed for `Budget(bytes=...)`. No layer is
    planned beyond `max_sparsity` (default: the table's largest ratio), so the plan never
    leaves the measured part of a curve. A budget that cannot be met within that is a
    BudgetError saying how close the table gets.
    """
    if not isinstance(table, SensitivityTable) or table.axis != "sparsity":
        raise TypeError("table must be a pruning SensitivityTable (sensitivity(..., ratios=))")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
    if table.structure == "channel":
        raise ValueError("plan_budget plans weight or N:M pruning; a channel table's rows "
                         "are groups, which penjing.prune.channels prunes by one ratio")
    cap = max(table.points) if max_sparsity is None else float(max_sparsity)
    if not 0.0 <= cap < 1.0:
        raise ValueError(f"max_sparsity must be in [0, 1), got {max_sparsity}")
    if budget.kind == "bytes":
        if bits is None or bits.axis != "bits":
            raise ValueError(
                "a bytes budget plans bits too: pass bits=sensitivity(..., bits=[...])"
            )
        missing = sorted(set(table.layers) - set(bits.layers))
        if missing:
            raise ValueError(f"the bits table has no rows for {missing}")
        return _plan_bytes(table, bits, budget, cap)
    return _plan_pruning(table, budget, cap)


def _unit_cost(table: SensitivityTable, layer: str, kind: str) -> float:
    """What pruning one weight of `layer` saves in the budget's unit."""
    if kind == "macs":
        if layer not in table.macs:
            raise ValueError(f"a MACs budget needs table.macs for every layer; {layer!r} has none "
                             "(pass macs= to sensitivity, e.g. from penjing.core.counting)")
        return table.macs[layer] / table.sizes[layer]
    return 1.0


def _plan_pruning(table: SensitivityTable, budget: Budget, cap: float) -> Plan:
    kind = budget.kind
    layers = table.layers
    n = {name: table.sizes[name] for name in layers}
    unit = {name: _unit_cost(table, name, kind) for name in layers}
    total = sum(n[name] * unit[name] for name in layers)
    # How much must be removed, in the budget's unit (weights, or MACs).
    if kind == "sparsity":
        need = round(budget.sparsity * sum(n.values()))
    elif kind == "params":
        need = sum(n.values()) - budget.params
    elif kind == "macs":
        need = total - budget.macs
    else:
        need = math.inf
    curves = {}
    segments = []  # (slope, layer, r0, r1, d0, d1)
    for name in layers:
        ratios, drops = _curve(table, name)
        inside = ratios <= cap
        r = np.append(ratios[inside], cap) if ratios[inside][-1] < cap else ratios[inside]
        d = np.array([_interp(ratios, drops, x) for x in r])
        curves[name] = (ratios, drops)
        hull = _lower_hull(r, d)
        for a, b in zip(hull, hull[1:], strict=False):
            saved = (r[b] - r[a]) * n[name] * unit[name]
            segments.append(((d[b] - d[a]) / saved, name, r[a], r[b], d[a], d[b]))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    ratio = dict.fromkeys(layers, 0.0)
    removed = 0.0
    dropped = 0.0
    for slope, name, r0, r1, d0, d1 in segments:
        if ratio[name] != r0:  # hull segments of one layer come in order (convexity)
            continue
        size = (r1 - r0) * n[name] * unit[name]
        if kind == "max_drop":
            room = budget.max_drop - dropped
            if d1 - d0 > room:
                if slope > 0:
                    ratio[name] = r0 + (r1 - r0) * room / (d1 - d0)
                break
            ratio[name], dropped = r1, dropped + (d1 - d0)
            continue
        if removed + size >= need:
            ratio[name] = r0 + (r1 - r0) * (need - removed) / size
            removed = need
            break
        ratio[name], removed = r1, removed + size
    if kind != "max_drop" and removed < need:
        reach = sum(cap * n[x] * unit[x] for x in layers)
        raise BudgetError(
            f"{kind} budget {getattr(budget, kind)} needs {need:,.0f} "
            f"{'MACs' if kind == 'macs' else 'weights'} removed, but pruning every layer to "
            f"the cap of {cap:.0%} removes {reach:,.0f}; add larger ratios to the sweep or "
            "raise max_sparsity"
        )
    pruned = _integer_counts(ratio, n, unit, kind, need)
    choices = {}
    for name in layers:
        s = pruned[name] / n[name]
        choices[name] = LayerChoice(s, pruned[name], n[name],
                                    predicted_drop=_interp(*curves[name], s))
    return Plan(choices, budget, sum(c.predicted_drop for c in choices.values()), table.metric)


def _integer_counts(ratio, n, unit, kind, need) -> dict[str, int]:
    """Whole weights per layer; for a sparsity or params budget they add up exactly."""
    counts = {name: min(n[name] - 1, round(ratio[name] * n[name])) if n[name] else 0
              for name in ratio}
    if kind in ("sparsity", "params"):
        short = int(need) - sum(counts.values())
        # Put the rounding remainder on the layers that were being pruned last (the
        # largest fractional parts), one weight each, without passing a layer's size.
        order = sorted(ratio, key=lambda x: -(ratio[x] * n[x] - math.floor(ratio[x] * n[x])))
        step = 1 if short > 0 else -1
        while short:
            moved = False
            for name in order:
                if short == 0:
                    break
                if 0 <= counts[name] + step <= n[name] - 1:
                    counts[name] += step
                    short -= step
                    moved = True
            if not moved:
                raise BudgetError(f"cannot prune exactly {need} weights across these layers")
    return counts


# ---- joint sparsity and bits ------------------------------------------------------------


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def estimate_bytes(weights: int, sparsity: float | np.ndarray, bits: int) -> np.ndarray:
    """Coded bytes of a pruned, shared layer as the .pjz stores it: the zero/non-zero
    pattern at its entropy, each kept weight at `bits`, and the codebook."""
    keep = 1.0 - np.asarray(sparsity, dtype=np.float64)
    pattern = weights * _binary_entropy(keep)
    values = weights * keep * bits
    return (pattern + values) / 8 + CODEBOOK_ENTRY_BYTES * (2**bits - 1)


def _plan_bytes(table: SensitivityTable, bits: SensitivityTable, budget: Budget,
                cap: float) -> Plan:
    """Greedy over each layer's lower hull of (bytes, drop) across (ratio, bits) options."""
    grid = np.round(np.arange(0.0, cap + 1e-9, 0.005), 6)
    options = {}
    for name in table.layers:
        ratios, drops = _curve(table, name)
        prune_drop = np.interp(grid, ratios, drops)
        bit_drop = np.maximum.accumulate(np.maximum(
            np.array(bits.drop(name))[np.argsort(-np.array(bits.points))], 0.0))
        bit_values = sorted(bits.points, reverse=True)
        cands = []
        for b, bd in zip(bit_values, bit_drop, strict=True):
            size = estimate_bytes(table.sizes[name], grid, int(b))
            cands += [(float(sz), float(pd + bd), float(r), int(b))
                      for sz, pd, r in zip(size, prune_drop, grid, strict=True)]
        cands.sort(key=lambda c: (-c[0], c[1]))  # most bytes first
        # Lower hull of drop against bytes saved.
        xs = np.array([cands[0][0] - c[0] for c in cands])
        ys = np.array([c[1] for c in cands])
        hull = _lower_hull(xs, ys)
        # Drop hull points that do not lower the drop as bytes grow (dominated).
        options[name] = [cands[i] for i in hull]
    pos = dict.fromkeys(options, 0)
    total = sum(opts[0][0] for opts in options.values())
    dropped = sum(opts[0][1] for opts in options.values())
    while True:
        if budget.kind == "bytes" and total <= budget.bytes:
            break
        best = None
        for name, opts in options.items():
            i = pos[name]
            if i + 1 < len(opts):
                saved = opts[i][0] - opts[i + 1][0]
                cost = opts[i + 1][1] - opts[i][1]
                slope = cost / saved if saved > 0 else math.inf
                if best is None or slope < best[0]:
                    best = (slope, name)
        if best is None:
            raise BudgetError(
                f"bytes budget {budget.bytes:,} is below the {total:,.0f} bytes the table's "
                f"largest ratio ({cap:.0%}) and fewest bits reach; add larger ratios or fewer bits"
            )
        name = best[1]
        i = pos[name]
        total += options[name][i + 1][0] - options[name][i][0]
        dropped += options[name][i + 1][1] - options[name][i][1]
        pos[name] = i + 1
    choices = {}
    for name, opts in options.items():
        size, drop, r, b = opts[pos[name]]
        n = table.sizes[name]
        pruned = min(n - 1, round(r * n))
        choices[name] = LayerChoice(pruned / n, pruned, n, b, drop, size)
    notes = [f"estimated weight bytes {total:,.0f} (pattern at its entropy + bits per kept "
             "weight + codebook)"]
    return Plan(choices, budget, dropped, table.metric, notes)
