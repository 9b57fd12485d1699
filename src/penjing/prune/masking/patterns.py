"""Structured masks: zero whole groups of weights (shapes, kernels, stripes, vectors, blocks).

A *pattern* cuts a weight into groups; `pattern_` zeroes the lowest-norm `sparsity` of the
groups of every chosen layer with the ordinary `penjing.core.parametrize` parametrization, so
fine-tuning keeps them at zero. `group_lasso` is the regularizer that trains a network
towards such a pattern (Wen et al., NeurIPS'16: λ·Σ_g √|g|·‖w_g‖₂ drives whole groups to 0).

Groups, for a conv weight (out, in, kh, kw) seen as the im2col matrix (out, in·kh·kw):
- Shape(): one column, the same (c, kh, kw) position in every filter. Removing columns
  shrinks the im2col GEMM; `penjing.prune.compact_` re-expresses such a conv for real.
- Kernel(): one kh×kw kernel, filter j's weights on input channel c.
- Stripe(): one 1×1×C stripe, filter j's weights at one kernel position (SWP).
- Block(r, c): an r×c tile of the matrix (rows = outputs); Block(4, 1) is a vector.
A Linear weight (out, in) is that matrix already; Kernel() and Stripe() need a conv.

>>> pj.prune.pattern_(model, "block", sparsity=0.5)      # half the 2×2 blocks
>>> loss_fn = pj.prune.group_lasso_loss("shape", lam=1e-4) # train towards it first
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from penjing.core.parametrize import get_mask, select_layers, set_mask_
from penjing.errors import UnsupportedLayerError
from penjing.prune.masking.magnitude import check_sparsity
from penjing.train import LossFn, cross_entropy, with_penalty


@dataclass(frozen=True)
class Shape:
    """The same (c, kh, kw) weight in every filter of a layer: a column of im2col."""


@dataclass(frozen=True)
class Kernel:
    """One kh×kw kernel: filter j's weights on input channel c."""


@dataclass(frozen=True)
class Stripe:
    """One 1×1×C stripe: filter j's weights at one kernel position (Meng et al., NeurIPS'20)."""


@dataclass(frozen=True)
class Block:
    """An r×c tile of the (outputs, inputs·kh·kw) weight matrix; Block(4, 1) is a vector."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Block {name} must be a positive int, got {value!r}")


Pattern = Shape | Kernel | Stripe | Block
PATTERNS: dict[str, Pattern] = {
    "shape": Shape(),
    "kernel": Kernel(),
    "stripe": Stripe(),
    "vector": Block(4, 1),
    "block": Block(2, 2),
}


def resolve_pattern(pattern: str | Pattern) -> Pattern:
    """A pattern by name (one of PATTERNS) or the value itself."""
    if isinstance(pattern, Shape | Kernel | Stripe | Block):
        return pattern
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {sorted(PATTERNS)} or "
                         "pass Shape(), Kernel(), Stripe() or Block(rows, cols)")
    return PATTERNS[pattern]


def group_ids(weight: torch.Tensor, pattern: str | Pattern) -> tuple[torch.Tensor, int]:
    """For every entry of `weight`, the index of its group, and the number of groups."""
    pattern = resolve_pattern(pattern)
    shape = weight.shape
    out = shape[0]
    if weight.dim() < 2:
        raise UnsupportedLayerError(f"a {weight.dim()}-D weight has no {pattern} groups")
    if isinstance(pattern, Kernel | Stripe) and weight.dim() < 3:
        raise UnsupportedLayerError(
            f"{type(pattern).__name__}() groups need a conv weight (out, in, kh, kw), got "
            f"shape {tuple(shape)}; use Shape() or Block() for Linear layers"
        )
    cin, spatial = shape[1], math.prod(shape[2:])
    if isinstance(pattern, Shape):
        ids = torch.arange(cin * spatial).expand(out, -1)
        return ids.reshape(shape), cin * spatial
    if isinstance(pattern, Kernel):
        ids = torch.arange(out * cin).view(out, cin, 1).expand(-1, -1, spatial)
        return ids.reshape(shape), out * cin
    if isinstance(pattern, Stripe):
        ids = torch.arange(out * spatial).view(out, 1, spatial).expand(-1, cin, -1)
        return ids.reshape(shape), out * spatial
    width = cin * spatial
    row_blocks = math.ceil(out / pattern.rows)
    col_blocks = math.ceil(width / pattern.cols)
    rows = torch.arange(out).div(pattern.rows, rounding_mode="floor").view(-1, 1)
    cols = torch.arange(width).div(pattern.cols, rounding_mode="floor").view(1, -1)
    return (rows * col_blocks + cols).reshape(shape), row_blocks * col_blocks


def group_norms(weight: torch.Tensor, pattern: str | Pattern, eps: float = 0.0) -> torch.Tensor:
    """‖w_g‖₂ of every group, differentiable (the group lasso's terms)."""
    ids, count = group_ids(weight, pattern)
    squares = torch.zeros(count, dtype=weight.dtype, device=weight.device)
    squares = squares.index_add(0, ids.reshape(-1).to(weight.device), weight.reshape(-1) ** 2)
    return (squares + eps).sqrt()


def group_sizes(weight: torch.Tensor, pattern: str | Pattern) -> torch.Tensor:
    """How many weights each group holds (edge blocks of a ragged matrix hold fewer)."""
    ids, count = group_ids(weight, pattern)
    return torch.bincount(ids.reshape(-1), minlength=count)


def pattern_mask(weight: torch.Tensor, pattern: str | Pattern, sparsity: float) -> torch.Tensor:
    """A 0/1 mask zeroing the round(sparsity · groups) groups of lowest RMS magnitude.

    RMS (the norm over √size) keeps the smaller edge blocks of a ragged matrix comparable.
    """
    sparsity = check_sparsity(sparsity)
    ids, count = group_ids(weight, pattern)
    with torch.no_grad():
        norms = group_norms(weight.detach().float(), pattern)
        rms = norms / group_sizes(weight, pattern).clamp_min(1).float().sqrt()
        keep = torch.ones(count, dtype=weight.dtype, device=weight.device)
        drop = round(sparsity * count)
        if drop:
            keep[torch.argsort(rms, stable=True)[:drop]] = 0
    return keep[ids.to(weight.device)]


def _pattern_layers(
    model: nn.Module, pattern: Pattern, layers: list[str] | None
) -> dict[str, nn.Module]:
    """The chosen layers the pattern applies to: Kernel and Stripe skip Linear layers by
    default, and naming one is an error."""
    chosen = select_layers(model, layers)
    if not isinstance(pattern, Kernel | Stripe):
        return chosen
    for name, module in chosen.items():
        if layers is not None and not isinstance(module, nn.modules.conv._ConvNd):
            raise UnsupportedLayerError(
                f"layer {name!r} is a {type(module).__name__}; {type(pattern).__name__}() "
                "groups need a conv; leave it out of layers= or use Shape() or Block()"
            )
    return {n: m for n, m in chosen.items() if isinstance(m, nn.modules.conv._ConvNd)}


def pattern_(
    model: nn.Module,
    pattern: str | Pattern,
    sparsity: float = 0.5,
    layers: list[str] | None = None,
) -> dict[str, float]:
    """Zero the lowest-norm `sparsity` of the pattern's groups in each chosen layer, in place.

    Default layers: every Linear/Conv the pattern applies to (Kernel and Stripe skip
    Linear layers; naming one is an error). A mask already there is kept (the new one is
    multiplied in). Returns each layer's fraction of zero weights.
    """
    pattern = resolve_pattern(pattern)
    sparsity = check_sparsity(sparsity)
    done = {}
    for name, module in _pattern_layers(model, pattern, layers).items():
        mask = pattern_mask(module.weight.detach(), pattern, sparsity)
        old = get_mask(module)
        set_mask_(module, mask if old is None else mask * old)
        done[name] = float((module.weight == 0).float().mean())
    return done


def is_pattern(weight: torch.Tensor, pattern: str | Pattern) -> bool:
    """Whether every group of `weight` (or of a mask) is entirely zero or entirely non-zero.

    Meant for masks and freshly masked weights; a trained weight may hold a stray exact
    zero inside a kept group.
    """
    ids, count = group_ids(weight, pattern)
    nonzero = torch.zeros(count, dtype=torch.long).index_add(
        0, ids.reshape(-1), (weight.detach().reshape(-1) != 0).long())
    sizes = group_sizes(weight, pattern)
    return bool(((nonzero == 0) | (nonzero == sizes)).all())


def group_lasso(
    model: nn.Module, pattern: str | Pattern, lam: float, layers: list[str] | None = None
) -> torch.Tensor:
    """λ·Σ_layers Σ_g √|g|·‖w_g‖₂: add it to the loss to push whole groups to zero."""
    if isinstance(lam, bool) or not isinstance(lam, int | float) or lam < 0:
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    pattern = resolve_pattern(pattern)
    total = None
    for module in _pattern_layers(model, pattern, layers).values():
        weight = module.weight
        # eps keeps the gradient finite at an all-zero group, where ‖w‖ has no derivative
        norms = group_norms(weight, pattern, eps=1e-12)
        term = (group_sizes(weight, pattern).to(weight.device).float().sqrt() * norms).sum()
        total = term if total is None else total + term
    if total is None:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no chosen layer for {pattern} groups; Kernel() and "
            "Stripe() need a conv: use Shape() or Block(), or name convs in layers="
        )
    return lam * total


def group_lasso_loss(
    pattern: str | Pattern, lam: float = 1e-4, base: LossFn = cross_entropy,
    layers: list[str] | None = None,
) -> LossFn:
    """`base` loss plus the group lasso, as a `loss_fn(model, x, y)` for `penjing.train.fit`."""
    pattern = resolve_pattern(pattern)
    return with_penalty(lambda model: group_lasso(model, pattern, lam, layers), base)
