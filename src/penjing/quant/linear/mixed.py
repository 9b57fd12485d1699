"""Mixed precision: a weight bit width per layer, chosen from a measured sensitivity under a
total size budget.

Sensitivity: quantize one layer's weights alone (symmetric, per output channel) at each
candidate width and measure the model's output on a few batches against float: output
SQNR, or the loss increase when the batches carry labels (`metric="loss"`). Allocation:
start every layer at the widest candidate and repeatedly narrow the layer whose next step
down adds the least output noise per bit saved, until the weights fit the budget (noise
powers of independent layers add, so 10^(−SQNR/10) is summed). The result maps onto a
`QuantConfig` whose `layers` pin each layer's width, so PTQ, QAT and ONNX export use the
same per-layer choice.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from penjing import inputs
from penjing.quant.linear.config import QuantConfig
from penjing.quant.linear.fakequant import weight_qparams
from penjing.quant.linear.primitives import PerChannel, QuantSpec, fake_quantize, sqnr

MIXED_BITS = (2, 4, 8, 16)
METRICS = ("sqnr", "loss")
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SCALE_BITS = 32  # one float32 scale per output channel


def check_bits(bits: Iterable[int]) -> tuple[int, ...]:
    """The candidate widths sorted, or a ValueError naming the supported set."""
    chosen = tuple(sorted(set(bits)))
    if not chosen or any(isinstance(b, bool) or b not in MIXED_BITS for b in chosen):
        raise ValueError(f"mixed-precision bits must come from {MIXED_BITS}, got {bits!r}")
    return chosen


def _spec(bits: int) -> QuantSpec:
    return QuantSpec(bits, symmetric=True, signed=True, granularity=PerChannel(0))


def layer_bits(layer: nn.Module, bits: int) -> int:
    """Storage of `layer`'s weight at `bits`: the integers plus a scale per channel."""
    return layer.weight.numel() * bits + layer.weight.shape[0] * SCALE_BITS


@dataclass
class MixedPrecision:
    """The width per layer, the sensitivities it came from, and the sizes."""

    bits: dict[str, int]
    sensitivity: dict[str, dict[int, float]]  # layer → width → SQNR (dB) or loss increase
    metric: str
    size_bits: int  # of the chosen weights, scales counted
    budget_bits: int
    layer_sizes: dict[str, dict[int, int]] = field(default_factory=dict)

    def config(self, activation: QuantSpec | None = None, **kwargs) -> QuantConfig:
        """A QuantConfig that quantizes each chosen layer at its width (weights per
        channel; `activation` as in QuantConfig, None = weights only)."""
        layers = {re.escape(name): _spec(b) for name, b in self.bits.items()}
        return QuantConfig(weight=_spec(8), activation=activation, layers=layers, **kwargs)

    def format(self) -> str:
        """The per-layer table: width chosen, sensitivity at each width, size."""
        widths = sorted({b for s in self.sensitivity.values() for b in s})
        unit = "dB" if self.metric == "sqnr" else "Δloss"
        head = "| layer | bits | " + " | ".join(f"{b}-bit {unit}" for b in widths) + " | bytes |"
        lines = [head, "|" + "---|" * (3 + len(widths))]
        for name, b in self.bits.items():
            cells = " | ".join(f"{self.sensitivity[name][w]:.2f}" for w in widths)
            size = self.layer_sizes.get(name, {}).get(b, 0) // 8
            lines.append(f"| {name} | {b} | {cells} | {size:,} |")
        lines.append(f"total {self.size_bits // 8:,} bytes of weights and scales "
                     f"(budget {self.budget_bits // 8:,})")
        return "\n".join(lines)


@torch.no_grad()
def bits_sensitivity(
    model: nn.Module,
    loader: Iterable,
    *,
    bits: Iterable[int] = (2, 4, 8),
    layers: list[str] | None = None,
    batches: int = 2,
    metric: str = "sqnr",
) -> dict[str, dict[int, float]]:
    """{layer: {bits: output SQNR in dB (or loss increase)}} with only that layer's
    weights quantized; the model is left as it was. The few-batch measure `choose_bits`
    plans with; `penjing.analysis.sensitivity` is the sweep against any metric."""
    widths = check_bits(bits)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    modules = dict(model.named_modules())
    names = layers if layers is not None else [n for n, m in modules.items()
                                               if isinstance(m, LAYERS)]
    unknown = [n for n in names if not isinstance(modules.get(n), LAYERS)]
    if unknown or not names:
        raise ValueError(f"layers must name Linear/Conv modules of the model, got "
                         f"{unknown or names}")
    data = list(itertools.islice(loader, batches))
    if not data:
        raise ValueError("sensitivity needs at least one batch, got an empty loader")
    was = model.training
    model.eval()

    def run() -> list[torch.Tensor]:
        return [inputs.call(model, inputs.from_batch(b, model)) for b in data]

    def score(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
        if metric == "sqnr":

            return sqnr(torch.cat(ref), torch.cat(outs))
        losses = [F.cross_entropy(o, b[1]) for o, b in zip(outs, data, strict=True)]
        base = [F.cross_entropy(o, b[1]) for o, b in zip(ref, data, strict=True)]
        return float(sum(losses) - sum(base)) / len(data)

    if metric == "loss" and not all(isinstance(b, list | tuple) and len(b) > 1 for b in data):
        raise ValueError("metric='loss' needs (inputs, labels) batches; use metric='sqnr'")
    ref = run()
    result: dict[str, dict[int, float]] = {}
    try:
        for name in names:
            weight = modules[name].weight
            original = weight.detach().clone()
            result[name] = {}
            for b in widths:
                spec = _spec(b)
                scale, zero = weight_qparams(original, spec)
                weight.copy_(fake_quantize(original, scale, zero, spec))
                result[name][b] = score(run(), ref)
                weight.copy_(original)
    finally:
        model.train(was)
    return result


def choose_bits(
    model: nn.Module,
    loader: Iterable,
    budget_bits: int,
    *,
    bits: Iterable[int] = (2, 4, 8),
    layers: list[str] | None = None,
    batches: int = 2,
    metric: str = "sqnr",
) -> MixedPrecision:
    """Widths per layer from `bits` whose weights (plus a float32 scale per channel) fit
    in `budget_bits`, narrowing first where the output suffers least.

    >>> budget = pj.quant.uniform_bits(model, 4)          # the size of uniform 4-bit
    >>> mp = pj.quant.choose_bits(model, calib, budget); print(mp.format())
    >>> q = pj.quant.ptq(model, calib, mp.config(activation=None))
    """
    widths = check_bits(bits)
    table = bits_sensitivity(model, loader, bits=widths, layers=layers, batches=batches,
                        metric=metric)
    modules = dict(model.named_modules())
    sizes = {n: {b: layer_bits(modules[n], b) for b in widths} for n in table}
    smallest = sum(s[widths[0]] for s in sizes.values())
    if budget_bits < smallest:
        raise ValueError(f"budget of {budget_bits:,} bits is below the smallest choice, every "
                         f"layer at {widths[0]} bits ({smallest:,} bits); raise the budget or "
                         "allow fewer bits")

    def noise(name: str, b: int) -> float:
        value = table[name][b]
        return 10 ** (-value / 10) if metric == "sqnr" else max(value, 0.0)

    chosen = _allocate(list(table), widths, sizes, noise, budget_bits)
    total = sum(sizes[n][b] for n, b in chosen.items())
    return MixedPrecision(chosen, table, metric, total, budget_bits, sizes)


def _allocate(names: list[str], widths: tuple[int, ...], sizes: dict, noise, budget: int
              ) -> dict[str, int]:
    """The widths with the least summed noise whose sizes fit `budget`: a multiple-choice
    knapsack solved by dynamic programming over sizes rounded up to budget/STEPS, compared
    with every uniform choice that fits (which the rounding could otherwise exclude)."""
    unit = max(1, budget // _STEPS)
    capacity = budget // unit
    best = {0: (0.0, {})}  # used units → (noise, choice)
    for name in names:
        nxt: dict[int, tuple[float, dict]] = {}
        for used, (total, choice) in best.items():
            for b in widths:
                u = used + -(-sizes[name][b] // unit)
                if u > capacity:
                    continue
                value = total + noise(name, b)
                if u not in nxt or value < nxt[u][0]:
                    nxt[u] = (value, {**choice, name: b})
        best = _prune(nxt)
    candidates = list(best.values())
    for b in widths:
        if sum(sizes[n][b] for n in names) <= budget:
            candidates.append((sum(noise(n, b) for n in names), {n: b for n in names}))
    return min(candidates, key=lambda c: c[0])[1]


_STEPS = 4000  # size resolution of the allocation


def _prune(states: dict[int, tuple[float, dict]]) -> dict[int, tuple[float, dict]]:
    """Keep only states that no smaller state beats on noise (a Pareto front), so the
    table stays small on deep models."""
    kept, floor = {}, float("inf")
    for used in sorted(states):
        if states[used][0] < floor:
            kept[used] = states[used]
            floor = states[used][0]
    return kept


def uniform_bits(model: nn.Module, bits: int, layers: list[str] | None = None) -> int:
    """Weight storage of `model` (or `layers`) at one width, scales counted: the budget
    of uniform quantization to compare a mixed choice against."""
    check_bits([bits])
    modules = dict(model.named_modules())
    names = layers if layers is not None else [n for n, m in modules.items()
                                               if isinstance(m, LAYERS)]
    return sum(layer_bits(modules[n], bits) for n in names)
