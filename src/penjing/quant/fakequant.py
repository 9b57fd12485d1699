"""Fake-quantization modules: weights as a parametrization, activations as a module.

`WeightQuant` stacks on `weight` like a pruning Mask (mask first, then quantize) and
`finalize_` bakes it. `ActQuant` sits in the graph where an activation is quantized: it
observes while calibrating and fake-quantizes once frozen. In ONNX export both switch to
torch's `fake_quantize_per_*_affine`, which the exporter writes as QuantizeLinear /
DequantizeLinear; in PyTorch both use `penjing.quant.linear.fake_quantize`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.quant.linear import (
    _grouped,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    fake_quantize,
    qparams,
    reduce_range,
)
from penjing.quant.observers import Observer, make_observer

def _mse_range(w: torch.Tensor, spec: QuantSpec, steps: int = 40):
    """Per-slice range that minimises the squared weight error over shrunken min/max."""
    lo, hi = reduce_range(w, spec.granularity)
    best_err = best_lo = best_hi = None
    for k in range(steps):
        f = 1.0 - 0.7 * k / steps
        scale, zero = qparams(lo * f, hi * f, spec)
        err = (w - fake_quantize(w, scale, zero, spec)).square()
        if isinstance(spec.granularity, PerTensor):
            err = err.sum()
        elif isinstance(spec.granularity, PerChannel):
            err = err.movedim(spec.granularity.axis % w.dim(), 0).reshape(lo.shape[0], -1).sum(1)
        else:
            err = _grouped(err, spec.granularity.size).sum(-1)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo * f, hi * f
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * f, best_lo)
            best_hi = torch.where(better, hi * f, best_hi)
    return best_lo, best_hi


WEIGHT_RANGES: dict[str, Callable] = {
    "minmax": lambda w, spec: reduce_range(w, spec.granularity),
    "mse": _mse_range,
}


def weight_qparams(w: torch.Tensor, spec: QuantSpec, method: str | Callable = "minmax"):
    """Scale and zero point of a weight tensor; `method` is 'minmax', 'mse' or a callable
    `(weight, spec) -> (lo, hi)`."""
    if not callable(method):
        if method not in WEIGHT_RANGES:
            raise ValueError(f"unknown weight range {method!r}; choose one of {sorted(WEIGHT_RANGES)}")
        method = WEIGHT_RANGES[method]
    with torch.no_grad():
        return qparams(*method(w.detach().float(), spec), spec)


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value, gradient × factor (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def _export_fake_quantize(x, scale, zero, spec: QuantSpec) -> torch.Tensor:
    """The torch op the ONNX exporter maps to QuantizeLinear + DequantizeLinear.

    A range narrower than 8 bits (e.g. 7-bit weights) is stored in the int8 / uint8
    container: clamping x to the representable interval first gives the same integers.
    """
    qmin, qmax = (-128, 127) if spec.signed else (0, 255)
    if isinstance(spec.granularity, PerChannel):
        axis = spec.granularity.axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        s, z = scale.float().reshape(shape), zero.float().reshape(shape)
    else:
        s, z = scale.float().reshape(()), zero.float().reshape(())
    if (spec.qmin, spec.qmax) != (qmin, qmax):
        x = torch.maximum(torch.minimum(x, (spec.qmax - z) * s), (spec.qmin - z) * s)
    if isinstance(spec.granularity, PerChannel):
        return torch.fake_quantize_per_channel_affine(
            x, scale.float(), zero.to(torch.int32), axis, qmin, qmax
        )
    return torch.fake_quantize_per_tensor_affine(
        x, scale.float().reshape(()), zero.to(torch.int32).reshape(()), qmin, qmax
    )


def _exportable(spec: QuantSpec) -> bool:
    """Fits QuantizeLinear in ONNX opset 17: at most 8 bits, per tensor or per channel."""
    return spec.bits <= 8 and not isinstance(spec.granularity, PerGroup)


class WeightQuant(nn.Module):
    """Parametrization `weight -> fake_quantize(weight)`.

    `dynamic=True` (QAT) recomputes the range from the current weight in every forward;
    otherwise the scale is fixed when the parametrization is made. `learnable=True`
    makes the scale a parameter trained by LSQ.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        method: str | Callable = "minmax",
        learnable: bool = False,
        dynamic: bool = False,
    ) -> None:
        super().__init__()
        self.spec, self.method, self.dynamic = spec, method, dynamic and not learnable
        scale, zero = weight_qparams(weight, spec, method)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dynamic and self.training:
            scale, zero = weight_qparams(weight, self.spec, self.method)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)
        if torch.onnx.is_in_onnx_export() and _exportable(self.spec):
            return _export_fake_quantize(weight, self.scale, self.zero_point, self.spec)
        scale = self.scale
        if isinstance(scale, nn.Parameter):
            scale = _grad_scale(scale, 1 / math.sqrt(weight.numel() / scale.numel() * self.spec.qmax))
        return fake_quantize(weight, scale, self.zero_point, self.spec)

    def freeze_(self, weight: torch.Tensor) -> None:
        """Fix the scale to the range of `weight` (the end of QAT)."""
        if self.dynamic:
            scale, zero = weight_qparams(weight, self.spec, self.method)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)
        self.dynamic = False

    def extra_repr(self) -> str:
        return f"{self.spec}"


class ActQuant(nn.Module):
    """Observe an activation while calibrating, fake-quantize it once frozen.

    `forward(x, observe=False)` applies the quantizer without feeding the observer: the
    same scale reused after a value-preserving op (max-pool, flatten), so that ONNX Runtime
    can run that op on integers.
    """

    def __init__(self, spec: QuantSpec, observer: str | Callable[[QuantSpec], Observer] = "minmax") -> None:
        super().__init__()
        self.spec = spec
        self.observer = make_observer(observer, spec)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.frozen = False

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if not self.frozen:
            if observe:
                self.observer(x)
            return x
        if torch.onnx.is_in_onnx_export() and _exportable(self.spec):
            return _export_fake_quantize(x, self.scale, self.zero_point, self.spec)
        scale = self.scale
        if isinstance(scale, nn.Parameter) and self.training:
            scale = _grad_scale(scale, 1 / math.sqrt(x[0].numel() * self.spec.qmax))
        return fake_quantize(x, scale, self.zero_point, self.spec)

    def freeze_(self, name: str = "", learnable: bool = False) -> None:
        """Fix scale and zero point from what the observer saw."""
        try:
            scale, zero = self.observer.qparams()
        except ValueError as err:
            raise ValueError(f"activation quantizer {name!r}: {err}") from err
        delattr(self, "scale")
        if learnable:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.register_buffer("scale", scale.clone())
        self.zero_point = zero.clone()
        self.frozen = True

    def extra_repr(self) -> str:
        return f"{self.spec}, observer={type(self.observer).__name__}, frozen={self.frozen}"


def get_weight_quant(module: nn.Module) -> WeightQuant | None:
    """The fake-quant parametrization on `module.weight`, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, WeightQuant):
            return p
    return None
