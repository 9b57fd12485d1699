"""Linear (uniform) quantization primitives: q = clamp(round(x / s) + z, qmin, qmax).

Pure functions over tensors: `qparams` turns a range into a scale and zero point,
`quantize` / `dequantize` map between floats and integers, `fake_quantize` does both in
one step with the straight-through estimator so that it trains. What to quantize is a
`QuantSpec` (bits, symmetric, signed, granularity); granularity is a frozen value:
`PerTensor()`, `PerChannel(axis)` or `PerGroup(size)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per slice along `axis` (0 = output channels of a weight)."""

    axis: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"channel axis must be an int, got {self.axis!r}")


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive values of each row (row = output channel of a
    weight flattened to 2-D): group-wise weight quantization. A row that is not a
    multiple of `size` ends in a shorter group."""

    size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"group size must be a positive int, got {self.size!r}")


Granularity = PerTensor | PerChannel | PerGroup


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    `symmetric` fixes the zero point at 0 (weights); asymmetric ranges fit [min, max]
    exactly (activations after ReLU). `signed` picks [-2^(b-1), 2^(b-1)-1] over [0, 2^b-1].
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise ValueError(
                f"bits must be one of {ALLOWED_BITS} (2-8 or 16), got {self.bits!r}; "
                "use 8 for INT8, 4 for INT4"
            )
        if not isinstance(self.granularity, PerTensor | PerChannel | PerGroup):
            raise TypeError(
                "granularity must be PerTensor(), PerChannel(axis) or PerGroup(size), got "
                f"{self.granularity!r}"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


def _check_axis(x: torch.Tensor, axis: int) -> int:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"axis {axis} does not exist in a tensor of shape {tuple(x.shape)}; "
            f"use an axis in [{-x.dim()}, {x.dim() - 1}]"
        )
    return axis % x.dim()


def _grouped(x: torch.Tensor, size: int) -> torch.Tensor:
    """View `x` as (rows, groups, size): rows = dim 0, the rest flattened and split.

    A row whose length is not a multiple of `size` is padded with zeros; zero is inside
    every range `qparams` makes, so padding changes no scale.
    """
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    pad = -rows.shape[1] % size
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, size)


def _ungrouped(groups: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Undo `_grouped`: drop the padding and restore the shape of `x`."""
    n = x[0].numel() if x.dim() > 1 else x.numel()
    return groups.reshape(groups.shape[0], -1)[:, :n].reshape(x.shape)


def reduce_range(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `x` at `granularity`: scalars, one per channel, or (rows, groups).

    NaN or inf would give a NaN or infinite scale, so they are an error here, where the
    range of every weight and every observed activation is taken.
    """
    x = x.detach()
    if isinstance(granularity, PerTensor):
        lo, hi = x.min(), x.max()
    elif isinstance(granularity, PerChannel):
        axis = _check_axis(x, granularity.axis)
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        groups = _grouped(x, granularity.size)
        lo, hi = groups.min(dim=2).values, groups.max(dim=2).values
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):  # min/max keep a NaN
        raise ValueError(
            f"values to quantize must be finite, got NaN or inf in a tensor of shape "
            f"{tuple(x.shape)}; check the weights and the calibration inputs"
        )
    return lo, hi


def qparams(
    lo: torch.Tensor | float, hi: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that cover [lo, hi] with `spec`'s integer range.

    The range always contains 0 so that zero (padding, ReLU, pruned weights) is exact.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    tiny = torch.finfo(torch.float32).eps
    if spec.symmetric:
        bound = torch.maximum(-lo, hi) if spec.signed else hi
        scale = (bound / spec.qmax).clamp_min(tiny)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(tiny)
    zero = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero


def _expand(param: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Shape a scale / zero point so that it broadcasts against `x`."""
    g = spec.granularity
    if isinstance(g, PerTensor) or param.dim() == 0:
        return param
    if isinstance(g, PerChannel):
        axis = _check_axis(x, g.axis)
        shape = [1] * x.dim()
        shape[axis] = -1
        return param.reshape(shape)
    return param  # PerGroup: the caller works on the grouped view


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integers clamp(round(x / scale) + zero_point, qmin, qmax), as int32 (round half to even)."""
    if isinstance(spec.granularity, PerGroup):
        groups = _grouped(x, spec.granularity.size)
        q = torch.round(groups / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1)
        return _ungrouped(q.clamp(spec.qmin, spec.qmax).to(torch.int32), x)
    s, z = _expand(scale, x, spec), _expand(zero_point, x, spec)
    return (torch.round(x / s) + z).clamp(spec.qmin, spec.qmax).to(torch.int32)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Floats (q - zero_point) · scale."""
    if isinstance(spec.granularity, PerGroup):
        groups = _grouped(q, spec.granularity.size).float()
        return _ungrouped((groups - zero_point.unsqueeze(-1)) * scale.unsqueeze(-1), q)
    s, z = _expand(scale, q, spec), _expand(zero_point, q, spec)
    return (q.float() - z) * s


class _RoundSTE(torch.autograd.Function):
    """round() whose gradient is the identity: the straight-through estimator."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001 - autograd signature
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """dequantize(quantize(x)) in float, differentiable: the gradient passes straight
    through inside the range and is zero where x clips; a `scale` that requires grad
    gets the LSQ gradient (Esser et al., 2020)."""
    grouped = isinstance(spec.granularity, PerGroup)
    v = _grouped(x, spec.granularity.size) if grouped else x
    s = scale.unsqueeze(-1) if grouped else _expand(scale, x, spec)
    z = zero_point.unsqueeze(-1) if grouped else _expand(zero_point, x, spec)
    z = z.to(v.dtype)
    q = torch.clamp(_RoundSTE.apply(v / s) + z, spec.qmin, spec.qmax)
    out = (q - z) * s
    return _ungrouped(out, x) if grouped else out


def sqnr(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖x‖² / ‖x − approx‖²)."""
    signal = x.detach().double().square().sum()
    noise = (x.detach().double() - approx.detach().double()).square().sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
