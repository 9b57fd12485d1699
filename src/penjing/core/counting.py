"""Size and cost of a model: parameter count, multiply-accumulates, eager latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from penjing.core.modes import eval_mode


def _as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)


def count_params(model: nn.Module, *, nonzero: bool = False) -> int:
    """Number of parameters (shared ones counted once); `nonzero=True` counts only the
    entries that are not zero, which is what masks save."""
    unique = {id(p): p for p in model.parameters()}.values()
    if nonzero:
        return sum(int(torch.count_nonzero(p.detach())) for p in unique)
    return sum(p.numel() for p in unique)


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()  # the masked weight when a mask parametrization is on


def _attention_macs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int:
    """Projections plus the two attention products (QKᵀ and AV) of torch's attention."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    e = module.embed_dim
    tokens_q, tokens_k = q.numel() // q.shape[-1], k.numel() // k.shape[-1]
    keys = k.shape[1] if module.batch_first and k.dim() == 3 else k.shape[0]
    projections = tokens_q * e * e + tokens_k * (k.shape[-1] + v.shape[-1]) * e
    return projections + 2 * tokens_q * keys * e + tokens_q * e * e


def count_macs(model: nn.Module, example_inputs: Any, *, nonzero: bool = False) -> int:
    """Multiply-accumulates of conv, linear and attention layers in one forward pass.

    Counted from the real shapes (hooks), so pruned, grouped and depthwise layers are
    counted as they run; pass a batch of one for per-image MACs. Layers that define
    `macs(args, output)` (the re-expressed convs of `penjing.prune.compact_`, the attention
    products of `penjing.prune.HeadAttention`) count themselves. `nonzero=True` counts only
    products with a non-zero weight: what masked (N:M, block, shape, stripe) pruning would
    save on hardware that skips zeros.
    """
    total = 0

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        nonlocal total
        if callable(getattr(module, "macs", None)):
            total += int(module.macs(args, output))
            return
        if isinstance(module, nn.MultiheadAttention):
            total += _attention_macs(module, args, kwargs)
            return
        weight = _weight(module)
        per_weight = int(torch.count_nonzero(weight)) if nonzero else weight.numel()
        if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            # each weight is used once per input position, which it spreads over the output
            total += args[0].numel() // module.in_channels * per_weight
        elif isinstance(module, nn.modules.conv._ConvNd):
            # each weight is used once per output position of its filter
            total += output.numel() // module.out_channels * per_weight
        elif isinstance(module, nn.Linear):
            total += output.numel() // module.out_features * per_weight

    counted = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, counted) or callable(getattr(m, "macs", None))]
    try:
        with eval_mode(model), torch.no_grad():
            model(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return total


def spread(times: list[float]) -> tuple[float, float]:
    """(median, interquartile range over the median) of repeated timings."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, (q3 - q1) / median if median > 0 else 0.0


def latency_spread(model: nn.Module, example_inputs: Any, *, warmup: int = 3,
                   repeats: int = 15) -> tuple[float, float]:
    """(median seconds of one eager forward pass, interquartile range over the median) of
    `repeats` single timed passes after `warmup` untimed ones."""
    latency(model, example_inputs, warmup=warmup, repeats=1)
    return spread([latency(model, example_inputs, warmup=0, repeats=1)
                   for _ in range(max(repeats, 2))])


def latency(model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 30) -> float:
    """Median seconds of one eager forward pass on `example_inputs` (eval mode, no grad)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    inputs = _as_tuple(example_inputs)
    times = []
    with eval_mode(model), torch.no_grad():
        for _ in range(warmup):
            model(*inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
