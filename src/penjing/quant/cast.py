"""FP16 and BF16: a model whose weights and activations are half-width floats, and what
that costs in accuracy, measured.

FP16 keeps 10 mantissa bits but only 5 exponent bits (|x| ≤ 65504, subnormals below
6·10⁻⁵); BF16 keeps float32's range with 7 mantissa bits. `cast` returns a copy that
computes in the chosen type and hands float32 logits back; `cast_report` measures the
per-layer weight error and the output error against the float32 model on given inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from penjing.quant.linear.primitives import sqnr

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in (torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be 'fp16' or 'bf16' (torch.float16 / torch.bfloat16), got "
                     f"{dtype!r}")


class Cast(nn.Module):
    """`model` computing in `dtype`: float inputs are cast on the way in, float outputs
    back to float32 on the way out (so losses and metrics stay in float32)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args):
        args = [a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a
                for a in args]
        out = self.model(*args)
        if isinstance(out, tuple | list):
            return type(out)(o.float() if torch.is_tensor(o) else o for o in out)
        return out.float()


def cast(model: nn.Module, dtype: str | torch.dtype = "fp16") -> Cast:
    """A copy of `model` with every float parameter and buffer in FP16 or BF16, computing
    in that type (weights and activations).

    >>> half = pj.quant.cast(model, "bf16"); logits = half(x)   # float32 logits
    """
    dtype = _dtype(dtype)
    return Cast(copy.deepcopy(model).to(dtype).eval(), dtype)


@dataclass
class CastReport:
    """What casting cost: weight SQNR per tensor, and the outputs against float32."""

    dtype: str
    weight_sqnr: dict[str, float] = field(default_factory=dict)
    overflow: dict[str, int] = field(default_factory=dict)  # weights that became ±inf
    underflow: dict[str, int] = field(default_factory=dict)  # non-zero weights now 0
    output_sqnr: float = float("inf")
    max_abs_error: float = 0.0
    agreement: float | None = None  # top-1 equal to float32's, for (N, classes) outputs

    def format(self) -> str:
        worst = sorted(self.weight_sqnr.items(), key=lambda kv: kv[1])[:3]
        lines = [
            f"{self.dtype}: output SQNR {self.output_sqnr:.1f} dB, max |error| "
            f"{self.max_abs_error:.3g}"
            + ("" if self.agreement is None else f", top-1 agreement {self.agreement:.2%}"),
            "lowest weight SQNR: " + ", ".join(f"{n} {v:.1f} dB" for n, v in worst),
        ]
        if any(self.overflow.values()) or any(self.underflow.values()):
            lines.append(f"overflow {sum(self.overflow.values())} weights, underflow "
                         f"{sum(self.underflow.values())}")
        return "\n".join(lines)


@torch.no_grad()
def cast_report(model: nn.Module, inputs: torch.Tensor,
                dtype: str | torch.dtype = "fp16") -> CastReport:
    """Cast `model` to `dtype` and measure the error against float32 on `inputs`."""
    target = _dtype(dtype)
    report = CastReport(str(target).removeprefix("torch."))
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        low = t.to(target)
        report.weight_sqnr[name] = sqnr(t, low.float())
        report.overflow[name] = int((torch.isinf(low) & torch.isfinite(t)).sum())
        report.underflow[name] = int(((low == 0) & (t != 0)).sum())
    model = model.eval()
    ref = model(inputs)
    out = cast(model, target)(inputs)
    report.output_sqnr = sqnr(ref, out)
    report.max_abs_error = float((ref - out).abs().max())
    if ref.dim() == 2:
        report.agreement = float((ref.argmax(1) == out.argmax(1)).float().mean())
    return report
