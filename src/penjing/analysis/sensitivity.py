"""Sensitivity analysis: how much each layer alone can lose before the metric suffers.

One layer (or one coupled channel group) at a time is pruned to each ratio, or its
weights quantized to each bit width, the model is evaluated, and the layer's exact
weights are put back. The result is the classic table and chart of Han et al. (2015,
Fig. 6) and Li et al. (2017, Fig. 2): metric against ratio, one curve per layer, from
which `penjing.analysis.budget` chooses per-layer ratios and bits.

Under `torchrun --nproc_per_node N` (with the process group initialised, e.g. by
`penjing.distributed.init()`), each rank evaluates every N-th (layer, point) pair and
all ranks receive the same, complete table. The ranks then hold different models, so
`evaluate` must measure on this rank alone: `penjing.train.evaluate(m, loader,
shard=False)`, not the default, which averages over ranks.

    >>> table = sensitivity(model, lambda m: evaluate(m, test_subset),
    ...                     ratios=[0.5, 0.7, 0.9, 0.95])
    >>> print(table); table.save_csv("sens.csv"); table.plot("sens.png")
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from penjing.core.parametrize import select_layers
from penjing.errors import PenjingError
from penjing.prune.masking.nm import nm_mask
from penjing.prune.structural.graph import dependency_graph
from penjing.prune.structural.structured import score_groups
from penjing.quant.sharing.kmeans import kmeans_1d

STRUCTURES = ("weight", "channel", "nm")  # what a sparsity sweep removes
QUANTIZERS = ("kmeans", "linear")
NM_GROUP = 4  # N:M points prune to n = round((1 - ratio) * NM_GROUP) of every 4


class EvaluateError(PenjingError, RuntimeError):
    """The evaluate function raised; the model has been restored before this is raised."""


@dataclass
class SensitivityTable:
    """Metric per (layer, point): the rows of a sensitivity sweep.

    `axis` is "sparsity" (points are ratios in [0, 1)) or "bits" (points are bit widths).
    `sizes` is the number of weights each row's layer (or channel group) holds, `macs`
    its multiply-accumulates per input when known: the costs a budget trades against.
    """

    metric: str
    axis: str
    structure: str  # of a sparsity sweep: 'weight', 'nm' or 'channel'; 'weight' for bits
    baseline: float
    points: list[float]
    values: dict[str, list[float]]
    sizes: dict[str, int]
    macs: dict[str, int] = field(default_factory=dict)
    higher_is_better: bool = True
    seconds: float = 0.0
    world_size: int = 1
    quantizer: str | None = None  # of a bits sweep: 'kmeans' or 'linear'

    @property
    def layers(self) -> list[str]:
        return list(self.values)

    def drop(self, layer: str) -> list[float]:
        """How much worse than the baseline the metric is at each point (>= 0 is a loss)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - v) for v in self.values[layer]]

    def format(self) -> str:
        head = f"{'layer':<28} {'weights':>9} " + " ".join(
            f"{self._label(p):>8}" for p in self.points
        )
        rows = [f"{self.metric} by {self.axis} ({self.quantizer or self.structure}); baseline "
                f"{self.baseline:.4f}", head, "-" * len(head)]
        for layer, vals in self.values.items():
            rows.append(f"{layer[-28:]:<28} {self.sizes[layer]:>9,} " + " ".join(
                f"{v:>8.4f}" for v in vals))
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()

    def _label(self, point: float) -> str:
        return f"{int(point)} b" if self.axis == "bits" else f"{point:.3g}"

    def save_csv(self, path: str | os.PathLike) -> Path:
        """One row per layer: layer, weights, MACs, then the metric at each point; the
        baseline is the first data row (layer "<baseline>")."""
        path = Path(path)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "weights", "macs", *(f"{self.axis}={p:g}" for p in self.points)])
            w.writerow(["<baseline>", "", "", *([repr(self.baseline)] * len(self.points))])
            for layer, vals in self.values.items():
                w.writerow([layer, self.sizes[layer], self.macs.get(layer, ""),
                            *(repr(v) for v in vals)])
        return path

    def plot(self, path: str | os.PathLike) -> Path:
        """The classic chart: metric against ratio (or bits), one line per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for layer, vals in self.values.items():
            ax.plot(self.points, vals, marker="o", ms=3, label=layer)
        ax.axhline(self.baseline, color="gray", ls="--", lw=0.8, label="baseline")
        ax.set_xlabel("bits" if self.axis == "bits" else f"{self.structure} sparsity")
        ax.set_ylabel(self.metric)
        if self.axis == "bits":
            ax.invert_xaxis()
        ax.set_title(f"sensitivity: one layer at a time ({self.quantizer or self.structure})")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# ---- what one point does to one layer -----------------------------------------------------


def _smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count > 0:
        keep[torch.argsort(flat, stable=True)[:count]] = False
    return keep.view_as(scores)


def prune_weight(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """The weight with its round(ratio · n) smallest magnitudes zeroed (zeros count first)."""
    return weight * _smallest_mask(weight.abs(), round(ratio * weight.numel()))


def nm_weight(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    n = round((1.0 - ratio) * NM_GROUP)
    if not 0 < n < NM_GROUP:
        return weight.clone() if n >= NM_GROUP else torch.zeros_like(weight)
    return weight * nm_mask(weight, n, NM_GROUP)


def kmeans_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight with its non-zeros replaced by 2^bits − 1 k-means centroids (zeros kept,
    as Deep Compression stores them)."""
    alive = weight != 0
    out = weight.clone()
    if alive.any():
        result = kmeans_1d(weight[alive], 2**bits - 1, init="linear")
        centroids = torch.from_numpy(result.centroids).to(weight.dtype)
        out[alive] = centroids[torch.from_numpy(result.labels)]
    return out


def linear_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel linear quantization to `bits` bits (dequantized)."""
    levels = 2 ** (bits - 1) - 1
    per_row = (-1,) + (1,) * (weight.dim() - 1)
    if levels < 1:  # 1 bit: sign times the mean magnitude of the row (BWN)
        return torch.sign(weight) * weight.abs().flatten(1).mean(1).view(per_row)
    scale = (weight.abs().flatten(1).amax(1).clamp_min(1e-12) / levels).view(per_row)
    return (weight / scale).round().clamp(-levels, levels) * scale


# ---- the sweep --------------------------------------------------------------------------


def _target(module: nn.Module) -> torch.Tensor:
    """The tensor that holds the layer's weight: the unmasked original under a mask."""
    param = getattr(module, "parametrizations", None)
    if param is not None and "weight" in param:
        return param.weight.original
    return module.weight


def _check_points(ratios: Sequence[float] | None, bits: Sequence[int] | None) -> tuple:
    if (ratios is None) == (bits is None):
        raise ValueError("give exactly one of ratios= (a pruning sweep) or bits= (quantization)")
    if ratios is not None:
        points = list(ratios)
        if not points:
            raise ValueError("ratios must not be empty; e.g. ratios=[0.5, 0.7, 0.9]")
        for r in points:
            if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r < 1.0:
                raise ValueError(f"every ratio must be in [0, 1), got {r!r}; 0.9 prunes 90 %")
        return "sparsity", [float(r) for r in points]
    points = list(bits)
    if not points:
        raise ValueError("bits must not be empty; e.g. bits=[8, 6, 4, 3, 2]")
    for b in points:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise ValueError(f"every bit width must be an int in 1..16, got {b!r}")
    return "bits", [int(b) for b in points]


@dataclass
class _Unit:
    """One row of the table: the tensors it edits and how a point edits them."""

    name: str
    tensors: list[torch.Tensor]
    edit: Callable[[float], list[torch.Tensor]]
    size: int
    macs: int = 0


def _layer_units(model, layers, axis, structure, quantizer) -> list[_Unit]:
    edits = {"weight": prune_weight, "nm": nm_weight}
    quants = {"kmeans": kmeans_weight, "linear": linear_weight}
    units = []
    for name, module in select_layers(model, layers).items():
        t = _target(module)
        if axis == "bits":
            fn = quants[quantizer]

            def edit(b, t=t, fn=fn, module=module):
                return [fn(module.weight.detach(), int(b))]
        else:
            fn = edits[structure]
            if structure == "nm":
                nm_weight(t.detach(), 0.5)  # a layer whose input size 4 does not divide fails now

            def edit(r, t=t, fn=fn, module=module):
                return [fn(module.weight.detach(), r)]
        units.append(_Unit(name, [t], edit, t.numel()))
    return units


def _channel_units(model, layers, example_inputs, criterion) -> list[_Unit]:
    if example_inputs is None:
        raise ValueError("structure='channel' needs example_inputs= to trace the model")
    scored = score_groups(model, dependency_graph(model, example_inputs), criterion)
    units = []
    for group, score in scored:
        name = "+".join(group.producers) or group.modules[0]
        if layers is not None and not set(group.producers) & set(layers):
            continue
        tensors, seen = [], set()
        for s in group.slices:
            t = s.tensor(model)
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
        order = np.argsort(np.asarray(score, dtype=np.float64), kind="stable")
        size = sum(t.numel() for t in tensors)

        def edit(r, group=group, order=order, tensors=tensors):
            drop = order[: round(r * len(group))]
            out = [t.detach().clone() for t in tensors]
            index = {id(t): i for i, t in enumerate(tensors)}
            for s in group.slices:
                t = s.tensor(model)
                if t is None or not drop.size:
                    continue
                rows = np.concatenate([s.indices[c] for c in drop])
                out[index[id(t)]].index_fill_(s.dim, torch.from_numpy(rows).long(), 0)
            return out
        units.append(_Unit(name, tensors, edit, size))
    if layers is not None:
        missing = sorted(set(layers) - {p for u in units for p in u.name.split("+")})
        if missing:
            raise ValueError(f"no channel group is produced by {missing}; groups: "
                             f"{[u.name for u in units][:10]}")
    return units


def _world() -> tuple[int, int, Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    ratios: Sequence[float] | None = None,
    structure: str = "weight",
    *,
    bits: Sequence[int] | None = None,
    quantizer: str = "kmeans",
    layers: list[str] | None = None,
    example_inputs: Any = None,
    criterion: str = "l1",
    metric: str = "accuracy",
    higher_is_better: bool = True,
    macs: dict[str, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SensitivityTable:
    """Sweep each layer alone over `ratios` (pruning) or `bits` (quantization).

    `evaluate(model) -> float` is called once for the baseline and once per
    (layer, point); give it a fixed subset of the data, it dominates the time. After each
    point the layer's tensors are copied back, so the model ends bit-for-bit as it began,
    also when `evaluate` raises (an EvaluateError naming the layer and point).

    structure: "weight" (smallest magnitudes of the layer), "nm" (N:4 patterns, n =
    round((1 - ratio) * 4)) or "channel" (one coupled channel group per row, the lowest
    `criterion` scores first; needs `example_inputs`). With `bits`, `quantizer` is
    "kmeans" (2^bits − 1 shared values plus zero, as Deep Compression) or "linear"
    (symmetric per-channel). `layers` restricts the rows (names must exist).
    """
    axis, points = _check_points(ratios, bits)
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {list(STRUCTURES)}, got {structure!r}")
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    if axis == "bits" and structure != "weight":
        raise ValueError("a bits sweep quantizes whole layers: leave structure='weight'")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable model -> float, got {evaluate!r}")
    say = progress or (lambda _m: None)
    if structure == "channel":
        units = _channel_units(model, layers, example_inputs, criterion)
    else:
        units = _layer_units(model, layers, axis, structure, quantizer)
    if macs:
        for u in units:
            u.macs = int(macs.get(u.name, 0))
    start = time.perf_counter()
    baseline = _call(evaluate, model, "the baseline")
    rank, world, dist = _world()
    work = [(i, j) for i in range(len(units)) for j in range(len(points))]
    mine = {}
    with torch.no_grad():
        for i, j in work[rank::world]:
            unit, point = units[i], points[j]
            saved = [t.detach().clone() for t in unit.tensors]
            try:
                for t, new in zip(unit.tensors, unit.edit(point), strict=True):
                    t.copy_(new)
                mine[i, j] = _call(evaluate, model, f"layer {unit.name!r} at {axis} {point}")
            finally:
                for t, old in zip(unit.tensors, saved, strict=True):
                    t.copy_(old)
            say(f"{unit.name} {axis}={point:g}: {mine[i, j]:.4f}")
    if dist is not None:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    values = {u.name: [mine[i, j] for j in range(len(points))] for i, u in enumerate(units)}
    return SensitivityTable(
        metric=metric,
        axis=axis,
        structure=structure,
        quantizer=quantizer if axis == "bits" else None,
        baseline=baseline,
        points=points,
        values=values,
        sizes={u.name: u.size for u in units},
        macs={u.name: u.macs for u in units if u.macs},
        higher_is_better=higher_is_better,
        seconds=time.perf_counter() - start,
        world_size=world,
    )


def _call(evaluate: Callable, model: nn.Module, what: str) -> float:
    try:
        value = evaluate(model)
    except Exception as err:  # any failure of user code: say where, keep the cause
        raise EvaluateError(f"evaluate raised on {what}: {type(err).__name__}: {err}; "
                            "the model was restored") from err
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"evaluate must return a number, got {value!r} on {what}")
    return float(value)
