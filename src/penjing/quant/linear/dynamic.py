"""Dynamic INT8: int8 weights, activations quantized per batch at run time.

Each chosen nn.Linear becomes a `DynamicLinear`: its weight is stored as int8 (symmetric,
per output channel), and every call quantizes its input to uint8 over the range of that
very batch (min and max, both widened to include 0), multiplies in integers and scales the
int32 result back to float. No calibration data is needed, and an outlier in one batch
costs only that batch. ONNX export writes exactly ONNX Runtime's dynamic pattern
(DynamicQuantizeLinear → MatMulInteger → Cast → Mul by the two scales → Add bias), which
ONNX Runtime fuses into DynamicQuantizeMatMul on its integer kernels; PyTorch computes the
same integers, so the two agree to float rounding.

>>> q = pj.quant.dynamic(model)           # a copy; the model is left as it was
>>> pj.export.onnx(q, "q.onnx", {"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from penjing.core import history
from penjing.layers import as_filter
from penjing.quant.linear.eager import conv1d_to_linear_

_ONNX_FLOAT, _ONNX_INT8 = 1, 3  # TensorProto data types


def _quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight and float scale per output row, symmetric in [-(2^(b-1)-1), 2^(b-1)-1]."""
    top = 2 ** (bits - 1) - 1
    scale = weight.detach().abs().amax(dim=1).clamp_min(1e-12) / top
    q = torch.clamp(torch.round(weight.detach() / scale[:, None]), -top, top)
    return q.to(torch.int8), scale.float()


def _dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear's uint8 scale and zero point for `x`."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zero


class _DynamicMatMul(torch.autograd.Function):
    """y = dequant(quant_u8(x) · w_q) + bias, written to ONNX as ORT's dynamic pattern."""

    @staticmethod
    def forward(ctx, x, weight_t, weight_scale, bias):  # noqa: ANN001 - autograd signature
        scale, zero = _dynamic_qparams(x)
        xq = torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero
        y = (xq @ weight_t.float()) * (scale * weight_scale)
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, weight_t, weight_scale, bias):  # noqa: ANN001 - exporter signature
        xq, scale, zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        w_zero = g.op("Constant", value_t=torch.zeros((), dtype=torch.int8))
        y = g.op("MatMulInteger", xq, weight_t, zero, w_zero)
        y = g.op("Cast", y, to_i=_ONNX_FLOAT)
        y = g.op("Mul", y, g.op("Mul", scale, weight_scale))
        return y if bias is None or _is_none(bias) else g.op("Add", y, bias)


def _is_none(value) -> bool:  # noqa: ANN001 - a TorchScript graph value
    return value.node().mustBeNone() if hasattr(value, "node") else value is None


class DynamicLinear(nn.Module):
    """A Linear with int8 weights (per output row) and inputs quantized per call to uint8."""

    def __init__(self, linear: nn.Linear, bits: int = 8) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"dynamic quantization holds 2..8 weight bits, got {bits}")
        self.in_features, self.out_features, self.bits = (
            linear.in_features, linear.out_features, bits)
        q, scale = _quantize_rows(linear.weight, bits)
        # (in, out): MatMulInteger's B, stored as int8 in the ONNX file
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().clone().float()
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), as the layer computes with it."""
        return self.weight_t.t().float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DynamicMatMul.apply(x, self.weight_t, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bits={self.bits}, activations=uint8 per call"


def dynamic(
    model: nn.Module,
    *,
    reduce_range: bool = False,
    layers: list[str] | Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """A copy of `model` whose Linear layers (and transformers' GPT-2 Conv1D) run dynamic
    INT8: int8 weights per output channel, uint8 activations quantized per batch.

    `reduce_range=True` keeps weights in 7 bits, exact on x86 CPUs without VNNI (see
    `penjing.export.cpu_saturates_int8()`). `layers` (names or a penjing.layers filter)
    picks them (all Linear layers by default). A model without a Linear layer is an error.
    """
    chosen_fn = as_filter(model, layers)
    quantized = copy.deepcopy(model).eval()
    history.carry(model, quantized)
    conv1d_to_linear_(quantized)
    chosen = [n for n, m in quantized.named_modules()
              if isinstance(m, nn.Linear) and (chosen_fn is None or chosen_fn(m, n))]
    if not chosen:
        which = " that layers accepts" if layers is not None else ""
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer{which}; dynamic INT8 quantizes "
            "Linear layers only"
        )
    bits = 7 if reduce_range else 8
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = quantized.get_submodule(parent)
        setattr(owner, child, DynamicLinear(getattr(owner, child), bits))
    return quantized
