"""Fake-quantization modules: weights as a parametrization, activations as a module.

`WeightQuant` stacks on `weight` like a pruning Mask (mask first, then quantize) and
`finalize_` bakes it. `ActQuant` sits in the graph where an activation is quantized: it
observes while calibrating and fake-quantizes once frozen. In ONNX export both switch to
torch's `fake_quantize_per_*_affine`, which the exporter writes as QuantizeLinear /
DequantizeLinear; in PyTorch both use `penjing.quant.linear.primitives.fake_quantize`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.quant.linear.observers import Observer, make_observer
from penjing.quant.linear.primitives import (
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    _grouped,
    fake_quantize,
    qparams,
    reduce_range,
)


def _mse_range(
    w: torch.Tensor, spec: QuantSpec, steps: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
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


def weight_qparams(
    w: torch.Tensor, spec: QuantSpec, method: str | Callable = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a weight tensor; `method` is 'minmax', 'mse' or a callable
    `(weight, spec) -> (lo, hi)`."""
    if not callable(method):
        if method not in WEIGHT_RANGES:
            raise ValueError(
                f"unknown weight range {method!r}; choose one of {sorted(WEIGHT_RANGES)}"
            )
        method = WEIGHT_RANGES[method]
    with torch.no_grad():
        return qparams(*method(w.detach().float(), spec), spec)


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value, gradient × factor (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


class _LearnableScale(nn.Module):
    """A `scale` buffer that QAT may learn: LSQ's step-size gradient (Esser et al., 2020)
    reaches a parameter `log_scale`, trained in the log domain as TQT does (Jain et al.,
    2020) so that no optimizer step can make a scale zero or negative. The buffer always
    holds the value in use, so export, reports and checkpoints read one place."""

    def learn_scale_(self) -> None:
        """Start learning the scale."""
        self.log_scale = nn.Parameter(self.scale.detach().clamp_min(1e-12).log())

    def bake_scale_(self) -> None:
        """Stop learning: keep the learned value in the buffer, drop the parameter."""
        if "log_scale" in self._parameters:
            with torch.no_grad():
                self.scale.copy_(self.log_scale.exp())
            del self.log_scale

    def current_scale(self, per_scale: int) -> torch.Tensor:
        """The scale to quantize with; differentiable while learning. `per_scale` is the
        number of values sharing one scale (LSQ's gradient scale 1/√(n·qmax))."""
        if "log_scale" not in self._parameters:
            return self.scale
        with torch.no_grad():
            self.scale.copy_(self.log_scale.exp())
        scale = self.log_scale.exp()
        return _grad_scale(scale, 1 / math.sqrt(per_scale * self.spec.qmax))


def _export_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """The torch op the ONNX exporter maps to QuantizeLinear + DequantizeLinear.

    A range narrower than 8 bits (e.g. 7-bit weights) is stored in the int8 / uint8
    container: clamping x to the representable interval first gives the same integers.
    """
    qmin, qmax = (-128, 127) if spec.signed else (0, 255)
    scale, zero = scale.detach(), zero.detach()  # LSQ scales are parameters; export is inference
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


class _GroupQuantized(torch.autograd.Function):
    """fake_quantize, written to ONNX as one `penjing::GroupQuantized` node tagged with
    its quantizer: `penjing.export.blocked` replaces it by the stored integers (blocked
    DequantizeLinear), which no opset-17 op the exporter knows could hold."""

    @staticmethod
    def forward(ctx, weight, scale, zero, spec, tag):  # noqa: ANN001 - autograd signature
        return fake_quantize(weight, scale, zero, spec)

    @staticmethod
    def symbolic(g, weight, scale, zero, spec, tag):  # noqa: ANN001 - exporter signature
        out = g.op("penjing::GroupQuantized", weight, tag_i=tag)
        out.setType(weight.type())  # same shape and type: the exporter's shape inference
        return out


class WeightQuant(_LearnableScale):
    """Parametrization `weight -> fake_quantize(weight)`.

    `dynamic=True` (QAT) recomputes the range from the current weight in every forward;
    otherwise the scale is fixed when the parametrization is made. `learnable=True`
    learns the scale instead (LSQ, see _LearnableScale).
    """

    history_op = "quantize"  # a model file keeps it through that step, not "parametrize"

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
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)
        if learnable:
            self.learn_scale_()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dynamic and self.training:
            scale, zero = weight_qparams(weight, self.spec, self.method)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)
        scale = self.current_scale(weight.numel() // self.scale.numel())
        if torch.onnx.is_in_onnx_export() and _exportable(self.spec):
            return _export_fake_quantize(weight, self.scale, self.zero_point, self.spec)
        if torch.onnx.is_in_onnx_export() and isinstance(self.spec.granularity, PerGroup):
            return _GroupQuantized.apply(weight, self.scale, self.zero_point, self.spec, id(self))
        return fake_quantize(weight, scale, self.zero_point, self.spec)

    def freeze_(self, weight: torch.Tensor) -> None:
        """Fix the scale: to the range of `weight` (the end of QAT), or to the learned one."""
        if self.dynamic:
            scale, zero = weight_qparams(weight, self.spec, self.method)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)
        self.dynamic = False
        self.bake_scale_()

    def extra_repr(self) -> str:
        return f"{self.spec}"


class ActQuant(_LearnableScale):
    """Observe an activation while calibrating, fake-quantize it once frozen.

    `forward(x, observe=False)` applies the quantizer without feeding the observer: the
    same scale reused after a value-preserving op (max-pool, flatten), so that ONNX Runtime
    can run that op on integers. `name` says where it sits, for error messages.
    """

    def __init__(
        self,
        spec: QuantSpec,
        observer: str | Callable[[QuantSpec], Observer] = "minmax",
        name: str = "",
    ) -> None:
        super().__init__()
        self.spec, self.name = spec, name
        try:
            self.observer = make_observer(observer, spec)
        except ValueError as err:
            raise ValueError(f"activation quantizer {name!r}: {err}") from err
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.frozen = False

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if not self.frozen:
            if observe:
                try:
                    self.observer(x)
                except ValueError as err:  # e.g. a channel axis the activation lacks
                    raise ValueError(f"activation quantizer {self.name!r}: {err}") from err
            return x
        # LSQ counts the values of one sample that share the scale
        scale = self.current_scale(max(1, x[0].numel() // self.scale.numel()))
        if torch.onnx.is_in_onnx_export() and _exportable(self.spec):
            return _export_fake_quantize(x, self.scale, self.zero_point, self.spec)
        return fake_quantize(x, scale, self.zero_point, self.spec)

    def freeze_(self, name: str = "", learnable: bool = False) -> None:
        """Fix scale and zero point from what the observer saw; `learnable=True` then
        learns the scale (QAT)."""
        try:
            scale, zero = self.observer.qparams()
        except ValueError as err:
            raise ValueError(f"activation quantizer {name or self.name!r}: {err}") from err
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero.clone())
        self.frozen = True
        if learnable:
            self.learn_scale_()

    def extra_repr(self) -> str:
        return f"{self.spec}, observer={type(self.observer).__name__}, frozen={self.frozen}"


def get_weight_quant(module: nn.Module, tensor: str = "weight") -> WeightQuant | None:
    """The fake-quant parametrization on `module.<tensor>`, or None."""
    if not parametrize.is_parametrized(module, tensor):
        return None
    for p in getattr(module.parametrizations, tensor):
        if isinstance(p, WeightQuant):
            return p
    return None


def weight_tensors(module: nn.Module) -> list[tuple[str, str]]:
    """(submodule path, tensor name) of each weight linear quantization stores as integers
    for `module`: its `weight`; for nn.MultiheadAttention its input projection(s) and
    out_proj's weight."""
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight"] if module.in_proj_weight is not None else [
            "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [("", n) for n in names] + [("out_proj", "weight")]
    return [("", "weight")]
