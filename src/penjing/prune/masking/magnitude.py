"""Magnitude pruning of single weights: per layer, global, or Han's quality × std threshold."""

from __future__ import annotations

import torch
from torch import nn

from penjing.core.parametrize import select_layers, set_mask_


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """`sparsity` as a float, or a ValueError when it is not a fraction in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise TypeError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {sparsity}; 0.9 keeps 10 % of weights")
    return float(sparsity)


def _mask_smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A 0/1 mask over `scores` that zeroes exactly the `count` smallest (ties by position)."""
    flat = scores.flatten()
    mask = torch.ones_like(flat)
    if count > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:count]] = 0
    return mask.view_as(scores)


def magnitude_(
    model: nn.Module,
    sparsity: float | dict[str, float] | None = None,
    *,
    quality: float | dict[str, float] | None = None,
    scope: str = "layer",
    layers: list[str] | None = None,
) -> dict[str, float]:
    """Prune the smallest-magnitude weights of Linear/Conv layers in place; return sparsities.

    Give exactly one of:
    - `sparsity`: the fraction of weights to zero, one number for every layer or a dict
      {layer name: sparsity}. With `scope="layer"` each layer gets exactly
      round(sparsity · n) zeros; with `scope="global"` one threshold over all chosen layers
      zeroes round(sparsity · total) weights, wherever they are.
    - `quality`: Han et al.'s rule, prune |w| < quality · std(w) per layer.

    Weights pruned before stay pruned (their magnitude is zero), so calling this again
    with a higher sparsity continues an iterative schedule.

    >>> pj.prune.magnitude_(model, sparsity=0.9)              # 90 % zeros in every layer
    >>> pj.prune.magnitude_(model, sparsity={"fc1": 0.92, "fc3": 0.74})
    """
    if (sparsity is None) == (quality is None):
        raise ValueError("give exactly one of sparsity= or quality=")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    per_layer = sparsity if sparsity is not None else quality
    if isinstance(per_layer, dict):
        if layers is not None:
            raise ValueError("give layers either as the keys of the dict or as layers=, not both")
        layers = list(per_layer)
    chosen = select_layers(model, layers, conv1d=True)
    if quality is not None and scope != "layer":
        raise ValueError("quality= is a per-layer rule; use scope='layer'")
    if scope == "global" and isinstance(per_layer, dict):
        raise ValueError("scope='global' takes one sparsity for all layers, not a dict")

    def amount(name: str) -> float:
        value = per_layer[name] if isinstance(per_layer, dict) else per_layer
        if sparsity is not None:
            return check_sparsity(value, f"sparsity of {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"quality of {name!r} must be a number >= 0, got {value!r}")
        return float(value)

    # every value is checked before any layer changes: a bad one leaves the model as it was
    amounts = {name: amount(name) for name in chosen}
    with torch.no_grad():
        weights = {name: m.weight.detach() for name, m in chosen.items()}
        if quality is not None:
            for name, module in chosen.items():
                w = weights[name]
                threshold = amounts[name] * float(w.float().std())
                set_mask_(module, (w.abs() >= threshold) & (w != 0))
        elif scope == "layer":
            for name, module in chosen.items():
                w = weights[name]
                set_mask_(module, _mask_smallest(w.abs(), round(amounts[name] * w.numel())))
        else:
            target = amounts[next(iter(chosen))]
            flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
            mask = _mask_smallest(flat, round(target * flat.numel()))
            start = 0
            for name, module in chosen.items():
                n = weights[name].numel()
                set_mask_(module, mask[start : start + n].view_as(weights[name]))
                start += n
    return {name: float((m.weight == 0).float().mean()) for name, m in chosen.items()}
