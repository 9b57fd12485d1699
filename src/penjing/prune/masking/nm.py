"""N:M semi-structured sparsity: in every M consecutive input weights keep the N largest.

2:4 is what NVIDIA's sparse tensor cores (Ampere and later) run at up to twice the dense
rate. The groups run along the reduction dim: a Linear's input features, and a conv's input
channels at each kernel position (weight viewed as out × kh × kw × in), which is how the
sparse kernels lay a conv out. Masks are ordinary `penjing.core.parametrize` parametrizations,
so fine-tuning keeps the pattern.
"""

from __future__ import annotations

import torch
from torch import nn

from penjing.core.parametrize import get_mask, select_layers, set_mask_


def check_nm(n: int, m: int) -> None:
    """A ValueError unless `n`:`m` is a valid pattern: integers with 0 < n < m."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M needs integers 0 < n < m (2:4 by default), got {n}:{m}")


def _groups_view(weight: torch.Tensor, m: int) -> torch.Tensor:
    """`weight` as (…, M) rows of consecutive reduction-dim weights (a view for Linear)."""
    w = weight if weight.dim() == 2 else weight.movedim(1, -1)  # conv: out, kh, kw, in
    if w.shape[-1] % m:
        raise ValueError(
            f"N:M groups of {m} need the input size to be a multiple of {m}, got "
            f"{w.shape[-1]} (weight shape {tuple(weight.shape)}); leave this layer out"
        )
    return w.reshape(-1, m)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """A 0/1 mask keeping the `n` largest |w| of every `m` consecutive input weights."""
    check_nm(n, m)
    rows = _groups_view(weight.detach().abs(), m)
    keep = torch.topk(rows, n, dim=1).indices  # ties: topk picks deterministically on CPU
    mask = torch.zeros_like(rows).scatter_(1, keep, 1.0)
    if weight.dim() == 2:
        return mask.view_as(weight)
    shape = weight.movedim(1, -1).shape
    return mask.view(shape).movedim(-1, 1).contiguous()


def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every `m` consecutive input weights hold at most `n` non-zeros."""
    check_nm(n, m)
    try:
        rows = _groups_view(weight.detach(), m)
    except ValueError:
        return False
    return bool(((rows != 0).sum(dim=1) <= n).all())


def nm_(
    model: nn.Module, n: int = 2, m: int = 4, layers: list[str] | None = None
) -> list[str]:
    """Mask the chosen layers (default: every Linear/Conv whose input size M divides) to N:M.

    Returns the names of the layers masked. Layers named in `layers` that cannot hold N:M
    are an error; unnamed ones that cannot are skipped (depthwise convs, a 1-channel stem).
    """
    check_nm(n, m)
    chosen = select_layers(model, layers)  # only Linear and Conv layers
    done = []
    for name, module in chosen.items():
        weight = module.weight.detach()
        reduction = weight.shape[1]
        if reduction % m:
            if layers is not None:
                raise ValueError(f"layer {name!r} has {reduction} inputs per output, not a "
                                 f"multiple of {m}, so it cannot hold {n}:{m} sparsity")
            continue
        mask = nm_mask(weight, n, m)
        old = get_mask(module)
        set_mask_(module, mask if old is None else mask * old)
        done.append(name)
    return done
