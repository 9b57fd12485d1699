"""GPTQ (Frantar et al., 2023): weight-only quantization that corrects each column's
rounding error with the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ‖WX − ŴX‖², H = XXᵀ from calibration inputs.

Columns are visited in blocks (lazy batched updates: the error of a block reaches the rest
of the matrix in one product), optionally in order of decreasing Hessian diagonal
(activation order). Scales come per output row, or per group of input columns; with
activation order the groups are fixed from the original weights first ("static groups"),
so that a group stays a run of adjacent columns, the layout integer kernels read.

The result sits on the weight as the same fake quantizer weight-only quantization uses,
with GPTQ's scales: `pj.save` stores the integers, `pj.load` rebuilds it, ONNX export
writes MatMulNBits. `rounding="nearest"` is the round-to-nearest baseline through the same
code: the same grid, no error correction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from penjing.core.layerwise import (
    LayerStats,
    block_linears,
    compress_blocks_,
    inverse_hessian_factor,
    set_weight_matrix_,
    weight_matrix,
    without_dead_inputs,
)
from penjing.errors import UnsupportedLayerError
from penjing.layers import as_filter
from penjing.quant.linear.config import QuantConfig
from penjing.quant.linear.fakequant import get_weight_quant
from penjing.quant.linear.primitives import PerChannel, PerGroup, QuantSpec, qparams
from penjing.quant.linear.ptq import weights_in_place_


@dataclass(frozen=True)
class GPTQConfig:
    """Layer-wise weight quantization on calibration data (`pj.quant.quantize_(model,
    GPTQConfig(4, 128), calib=batches)`)."""

    bits: int = 4
    group_size: int | None = 128  # input columns per scale; None: one scale per row
    symmetric: bool = False  # asymmetric (a zero point per group) suits skewed rows
    act_order: bool = True  # columns by decreasing Hessian diagonal
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    block_size: int = 128  # columns per lazy update
    rounding: Literal["gptq", "nearest"] = "gptq"  # 'nearest': the baseline, same grid
    layers: Sequence[str] | Callable[[nn.Module, str], bool] | None = None
    batches: int | None = None  # calibration batches used (None: all)

    def __post_init__(self) -> None:
        check_grid(self.bits, self.group_size)
        if not (isinstance(self.damp, int | float) and 0 < self.damp < 1):
            raise ValueError(f"damp must be in (0, 1), got {self.damp!r}; 0.01 is GPTQ's")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.rounding not in ("gptq", "nearest"):
            raise ValueError(f"rounding must be 'gptq' or 'nearest', got {self.rounding!r}")

    @property
    def spec(self) -> QuantSpec:
        """The integer format of the weights (the fake quantizer's spec)."""
        return grid_spec(self.bits, self.group_size, self.symmetric)


def check_grid(bits: int, group_size: int | None) -> None:
    """The checks of a weight grid's bits and group size, shared by GPTQ and AWQ."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(
            group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int (32, 64, 128) or None, got "
                         f"{group_size!r}")


def grid_spec(bits: int, group_size: int | None, symmetric: bool) -> QuantSpec:
    """The integer format of weights quantized per row or per group of input columns."""
    granularity = PerChannel(0) if group_size is None else PerGroup(group_size)
    return QuantSpec(bits, symmetric, symmetric, granularity)


def _row_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` (rows, columns) covering its range."""
    return qparams(w.min(dim=1).values, w.max(dim=1).values, spec)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
           ) -> torch.Tensor:
    """One column (or several) to the grid and back: the value the fake quantizer gives."""
    q = (torch.round(w / scale) + zero).clamp(spec.qmin, spec.qmax)
    return (q - zero) * scale


@torch.no_grad()
def gptq_matrix(w: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quantized weight, scale, zero point) of an (out, in) matrix `w` given the layer's
    input Hessian (in × in). Scale and zero point have the fake quantizer's shapes: (out,)
    per row, (out, groups) per group."""
    spec = config.spec
    rows, cols = w.shape
    w, h = without_dead_inputs(w, hessian)
    size = config.group_size or cols
    groups = math.ceil(cols / size)
    scale = torch.zeros(rows, groups)
    zero = torch.zeros(rows, groups)
    static = config.act_order or config.rounding == "nearest"
    if static:  # fixed from the original weights, group by group
        for g in range(groups):
            s, z = _row_qparams(w[:, g * size:(g + 1) * size], spec)
            scale[:, g], zero[:, g] = s, z.float()
    if config.rounding == "nearest":
        grid_scale = scale.repeat_interleave(size, dim=1)[:, :cols]
        grid_zero = zero.repeat_interleave(size, dim=1)[:, :cols]
        q = _round(w, grid_scale, grid_zero, spec)
        return q, *_shaped(scale, zero, config)
    order = torch.argsort(h.diagonal(), descending=True) if config.act_order \
        else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    u = inverse_hessian_factor(h, config.damp).float()
    q = torch.zeros_like(w)
    for start in range(0, cols, config.block_size):
        end = min(start + config.block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // size
            if not static and column % size == 0:  # a group starts: its range as it is now
                current = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :size]
                s, z = _row_qparams(current, spec)
                scale[:, g], zero[:, g] = s, z.float()
            value = block[:, i]
            rounded = _round(value, scale[:, g], zero[:, g], spec)
            q[:, start + i] = rounded
            error = (value - rounded) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]
    q = q[:, torch.argsort(order)]
    return q, *_shaped(scale, zero, config)


def _shaped(scale: torch.Tensor, zero: torch.Tensor, config: GPTQConfig
            ) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = scale.float(), zero.round().to(torch.int32)
    if config.group_size is None:
        return scale[:, 0], zero[:, 0]
    return scale, zero


def _quantize_layer(name: str, layer: nn.Module, stats: LayerStats | None, config: GPTQConfig
                    ) -> dict[str, float]:
    if not isinstance(layer, nn.Linear):
        raise UnsupportedLayerError(
            f"layer {name!r} is a {type(layer).__name__}; GPTQ stores nn.Linear weights "
            "(transformers' Conv1D of GPT-2 stores them transposed): leave it out with layers=")
    w = weight_matrix(layer).float().clone()  # the layer's weight is overwritten below
    h = None if stats is None else stats.hessian
    if h is None:  # round-to-nearest reads no statistics: the grid is the weights' own
        h = torch.eye(w.shape[1], dtype=torch.float64)
    q, scale, zero = gptq_matrix(w, h, config)
    set_weight_matrix_(layer, q)
    delta = w - q
    error = float(torch.einsum("ij,jk,ik->", delta, h.float(), delta) / max(w.shape[0], 1))
    return {"error": error, "scale": scale, "zero": zero}


def gptq_(model: nn.Module, calib: Iterable, config: GPTQConfig,
          progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Quantize the weights of `model` with GPTQ on `calib`, block by block, in place.

    Returns each layer's output error on the calibration inputs, ‖(W − Ŵ)X‖² per row and
    token (for `rounding="nearest"`, which reads no inputs, ‖W − Ŵ‖² per row). The
    weights then carry a fake quantizer with GPTQ's scales (the same one `weight_only`
    puts on), recorded in the model's history.
    """
    chosen = as_filter(model, config.layers)
    method = lambda n, m, s: _quantize_layer(n, m, s, config)  # noqa: E731
    if config.rounding == "nearest":  # the grid is the weights' own: no inputs to run
        done = {name: method(name, layer, None) for name, layer in
                block_linears(model, chosen).items()}
    else:
        done = compress_blocks_(model, calib, method, layers=chosen, batches=config.batches,
                                progress=progress)
    attach_grid_(model, done, config.spec)
    return {name: done[name]["error"] for name in done}


def attach_grid_(model: nn.Module, done: dict[str, dict], spec: QuantSpec) -> None:
    """Put the fake quantizer of weight-only quantization on each layer of `done` (its
    weight already on the grid), with the scale and zero point the method chose: what
    `pj.save` stores as integers and the model's history records."""
    names = list(done)
    record = QuantConfig(weight=spec, activation=None, types=(nn.Linear,),
                         layers={**{re.escape(n): True for n in names}, ".*": False})
    weights_in_place_(model, record, False)
    for name in names:
        quantizer = get_weight_quant(model.get_submodule(name))
        quantizer.scale.copy_(done[name]["scale"].reshape(quantizer.scale.shape))
        quantizer.zero_point.copy_(done[name]["zero"].reshape(quantizer.zero_point.shape))
