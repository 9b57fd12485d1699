"""Pruning by what each layer sees on calibration data: SparseGPT and Wanda.

- **SparseGPT** (Frantar & Alistarh, 2023) zeroes the weights whose removal costs least in
  the layer's reconstruction loss ‖WX − ŴX‖² (w² / [H⁻¹]ᵢᵢ², chosen per block of columns)
  and moves each removed weight's error onto the columns not yet visited, through the
  inverse Hessian, as GPTQ does with rounding error.
- **Wanda** (Sun et al., 2024) scores each weight by |w| · ‖xⱼ‖₂, the size of what it
  adds to the output, and compares weights within each output row; no weight changes.

Both give unstructured sparsity (a fraction of every row) or N:M along the input features
(2:4 for sparse tensor cores), and leave a mask on the layer, as magnitude pruning does:
fine-tuning keeps the zeros, `pj.save` stores them, `finalize_` bakes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from penjing.core.layerwise import (
    LayerStats,
    compress_blocks_,
    inverse_hessian_factor,
    set_weight_matrix_,
    weight_matrix,
    without_dead_inputs,
)
from penjing.core.parametrize import get_mask, set_mask_
from penjing.layers import as_filter
from penjing.prune.masking.magnitude import check_sparsity
from penjing.prune.masking.nm import check_nm

Layers = Sequence[str] | Callable[[nn.Module, str], bool] | None


def _check_amount(config) -> None:
    """N:M, or a sparsity (0.5 when neither is given)."""
    if config.sparsity is None and config.n is None and config.m is None:
        object.__setattr__(config, "sparsity", 0.5)
    sparsity, n, m = config.sparsity, config.n, config.m
    if (n is None) != (m is None):
        raise ValueError(f"give n and m together for N:M sparsity (2 and 4 for 2:4), got "
                         f"n={n!r}, m={m!r}")
    if (sparsity is None) == (n is None):
        raise ValueError("give exactly one of sparsity (a fraction of every row) or n and m "
                         "(N:M along the inputs)")
    if n is not None:
        check_nm(n, m)
    else:
        check_sparsity(sparsity)


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT: `sparsity` of every row, or n of every m inputs kept, with the removed
    weights' error moved onto the others (`pj.prune.prune_(model, config, calib=batches)`)."""

    sparsity: float | None = None  # 0.5 unless n and m are given
    n: int | None = None
    m: int | None = None
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns whose mask is chosen together
    layers: Layers = None
    batches: int | None = None  # calibration batches used (None: all)

    def __post_init__(self) -> None:
        _check_amount(self)
        if not (isinstance(self.damp, int | float) and 0 < self.damp < 1):
            raise ValueError(f"damp must be in (0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1 or (self.m and self.block_size % self.m):
            raise ValueError(f"block_size must be a positive int and a multiple of m, got "
                             f"{self.block_size!r}")


@dataclass(frozen=True)
class WandaConfig:
    """Wanda: weights scored by |w| · ‖x‖, `sparsity` of every row or N:M removed."""

    sparsity: float | None = None  # 0.5 unless n and m are given
    n: int | None = None
    m: int | None = None
    layers: Layers = None
    batches: int | None = None

    def __post_init__(self) -> None:
        _check_amount(self)


def _keep_mask(scores: torch.Tensor, sparsity: float | None, n: int | None, m: int | None
               ) -> torch.Tensor:
    """Boolean mask of the weights to keep: the highest scores of every row (exactly
    round(sparsity · columns) removed per row), or the n highest of every m columns."""
    rows, cols = scores.shape
    if n is not None:
        if cols % m:
            raise ValueError(f"{cols} inputs per output are not a multiple of m = {m}")
        grouped = scores.reshape(rows, cols // m, m)
        order = torch.argsort(grouped, dim=2, descending=True, stable=True)
        keep = torch.zeros_like(grouped, dtype=torch.bool)
        keep.scatter_(2, order[:, :, :n], True)
        return keep.reshape(rows, cols)
    drop = round(sparsity * cols)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if drop:
        lowest = torch.argsort(scores, dim=1, stable=True)[:, :drop]
        keep.scatter_(1, lowest, False)
    return keep


def wanda_scores(w: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|w_ij| · ‖x_j‖₂ for an (out, in) matrix and the inputs' summed squares per feature."""
    return w.abs() * sq_norms.sqrt().to(w.dtype).unsqueeze(0)


@torch.no_grad()
def sparsegpt_matrix(w: torch.Tensor, hessian: torch.Tensor, config: SparseGPTConfig
                     ) -> torch.Tensor:
    """The pruned (out, in) matrix: its zeros are the mask, the other weights updated."""
    rows, cols = w.shape
    w, h = without_dead_inputs(w, hessian)
    u = inverse_hessian_factor(h, config.damp).float()
    step = config.block_size
    for start in range(0, cols, step):
        end = min(start + step, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        d = u_block.diagonal()
        if config.n is None:  # the block's share of every row, by the loss it would cost
            keep = _keep_mask(block.square() / d.square().unsqueeze(0), config.sparsity,
                              None, None)
        for i in range(end - start):
            if config.n is not None and i % config.m == 0:
                part = block[:, i:i + config.m]
                cost = part.square() / d[i:i + config.m].square().unsqueeze(0)
                keep_nm = _keep_mask(cost, None, config.n, config.m)
            kept = keep_nm[:, i % config.m] if config.n is not None else keep[:, i]
            value = block[:, i]
            pruned = torch.where(kept, value, torch.zeros_like(value))
            error = (value - pruned) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            block[:, i] = pruned
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
    return w.float()


def _mask_layer(layer: nn.Module, pruned: torch.Tensor) -> float:
    """Put the zeros of `pruned` (an (out, in) matrix) on the layer as a mask."""
    set_weight_matrix_(layer, pruned)
    keep = (layer.weight.detach() != 0).to(layer.weight.dtype)
    old = get_mask(layer)
    set_mask_(layer, keep if old is None else keep * old)
    return float((layer.weight == 0).float().mean())


def _check_layer(name: str, layer: nn.Module) -> None:
    if get_mask(layer) is None and torch.nn.utils.parametrize.is_parametrized(layer, "weight"):
        raise ValueError(f"layer {name!r} already carries a parametrization on its weight "
                         "(fake quantization or shared weights); prune before quantizing")


def sparsegpt_(model: nn.Module, calib: Iterable, config: SparseGPTConfig,
               progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Prune `model` with SparseGPT on `calib`, block by block, in place; return each
    layer's fraction of zero weights."""
    def run(name: str, layer: nn.Module, stats: LayerStats) -> float:
        _check_layer(name, layer)
        _check_divides(name, layer, config.m)
        return _mask_layer(layer, sparsegpt_matrix(weight_matrix(layer).float(),
                                                   stats.hessian, config))

    return compress_blocks_(model, calib, run, layers=as_filter(model, config.layers),
                            batches=config.batches, progress=progress)


def wanda_(model: nn.Module, calib: Iterable, config: WandaConfig,
           progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Prune `model` with Wanda on `calib`, block by block, in place; return each layer's
    fraction of zero weights."""
    def run(name: str, layer: nn.Module, stats: LayerStats) -> float:
        _check_layer(name, layer)
        _check_divides(name, layer, config.m)
        w = weight_matrix(layer).float()
        keep = _keep_mask(wanda_scores(w, stats.sq_norms), config.sparsity, config.n, config.m)
        return _mask_layer(layer, w * keep)

    return compress_blocks_(model, calib, run, layers=as_filter(model, config.layers),
                            batches=config.batches, progress=progress, hessian=False)


def _check_divides(name: str, layer: nn.Module, m: int | None) -> None:
    cols = weight_matrix(layer).shape[1]
    if m and cols % m:
        raise ValueError(f"layer {name!r} has {cols} inputs per output, not a multiple of "
                         f"{m}, so it cannot hold N:M sparsity; leave it out with layers=")


def expected_zeros(cols: int, config: SparseGPTConfig | WandaConfig, block: int | None = None
                   ) -> int:
    """Zeros per row the config leaves in a layer of `cols` inputs."""
    if config.n is not None:
        return cols // config.m * (config.m - config.n)
    if block is None:
        return round(config.sparsity * cols)
    return sum(round(config.sparsity * min(block, cols - s)) for s in range(0, cols, block))

