"""Per-layer report of a linearly quantized model: scale ranges and quantization error.

For each quantized layer: how its weights are stored, the range of its weight scales
and the weight SQNR, the scale of the activation quantizer after it, and the SQNR of the
layer's output against the float model on the same inputs (the error that has built up
by that layer), the worst-case accumulator width a + w + ⌈log2(fan-in)⌉ bits that an
integer kernel needs (every kernel we export to has 32), and where the output quantizer
sits: after a clipping activation ('fused relu6'), before an activation that has its own
('own quantizer (silu)'), right after the layer ('layer output'), or nowhere ('none').
SQNR = 10·log10(‖x‖² / ‖x − x̂‖²) dB; +6 dB is one more good bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from penjing.core.modes import eval_mode
from penjing.quant.linear.fakequant import ActQuant, WeightQuant, get_weight_quant, weight_tensors
from penjing.quant.linear.fold import fold_bn_
from penjing.quant.linear.graph import output_placements
from penjing.quant.linear.primitives import PerChannel, PerGroup, QuantSpec, sqnr


@dataclass(frozen=True)
class LayerStats:
    """What quantization did to one layer, measured."""

    name: str
    kind: str  # module type, e.g. Conv2d
    weight: str  # e.g. "int8/ch", "int4/g32", "float"
    scale_min: float | None  # smallest and largest weight scale
    scale_max: float | None
    weight_sqnr: float | None  # dB, fake-quantized weight against the float weight
    output_scale: float | None  # scale of the activation quantizer after the layer
    output_sqnr: float  # dB, layer output against the float model's, same inputs
    accumulator_bits: int | None  # worst case a·w + log2(fan-in): must fit int32 kernels
    output: str = "none"  # where the output quantizer sits, see quant.graph.output_placements


_SHORT = {"MultiheadAttention": "MHA"}


def _weight_quant(module: nn.Module) -> tuple[WeightQuant | None, str]:
    """The weight quantizer the report shows for `module`, and the tensor it sits on
    (nn.MultiheadAttention: its input projection; its out_proj is reported with it)."""
    _, tensor = weight_tensors(module)[0]
    return get_weight_quant(module, tensor), tensor


def _input_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    """{layer name: the activation quantizer its input comes from} in a traced model."""
    if not isinstance(model, fx.GraphModule):
        return {}
    found = {}
    for node in model.graph.nodes:
        arg = node.args[0] if node.op == "call_module" and node.args else None
        if isinstance(arg, fx.Node) and arg.op == "call_module":
            source = model.get_submodule(arg.target)
            if isinstance(source, ActQuant):
                found[node.target] = source
    return found


def describe(spec: QuantSpec | None) -> str:
    """A short label for a weight spec: int8/ch, uint4/t, int4/g32, float."""
    if spec is None:
        return "float"
    g = spec.granularity
    where = (
        "ch" if isinstance(g, PerChannel) and g.axis == 0
        else f"ch{g.axis}" if isinstance(g, PerChannel)
        else f"g{g.size}" if isinstance(g, PerGroup)
        else "t"
    )
    return f"{'int' if spec.signed else 'uint'}{spec.bits}/{where}"


def _capture(model: nn.Module, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of each named submodule of `model` on `inputs` (its last call)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, _args: tuple, out: object, name: str = name) -> None:
            # nn.MultiheadAttention returns (output, weights)
            outputs[name] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs


@torch.no_grad()
def layer_report(
    float_model: nn.Module, quantized: nn.Module, inputs: torch.Tensor
) -> list[LayerStats]:
    """LayerStats for every layer of `quantized` (from ptq / qat of `float_model`) that has
    quantized weights or an activation quantizer after it, in forward order."""
    reference = copy.deepcopy(float_model).eval()
    fold_bn_(reference)  # the quantized copy was folded too: compare like with like
    quantizers = {n: m for n, m in quantized.named_modules() if isinstance(m, ActQuant)}
    names = []
    for name, module in quantized.named_modules():
        if not name or isinstance(module, ActQuant):
            continue
        out_q = quantizers.get(f"{name.replace('.', '_')}_output_quant")
        if _weight_quant(module)[0] is not None or out_q is not None:
            names.append(name)
    inputs_quantized = _input_quantizers(quantized)
    placements = output_placements(quantized)
    with eval_mode(quantized):
        got = _capture(quantized, names, inputs)
    want = _capture(reference, [n for n in names if n in got], inputs)
    rows = []
    for name in got:  # hooks fire in forward order
        module = quantized.get_submodule(name)
        wq, tensor = _weight_quant(module)
        out_q = quantizers.get(f"{name.replace('.', '_')}_output_quant")
        w_sqnr = None
        if wq is not None:
            original = getattr(module.parametrizations, tensor).original
            w_sqnr = sqnr(original, getattr(module, tensor))
        kind = type(module).__name__.removeprefix("Parametrized")
        in_q = inputs_quantized.get(name)
        acc = None
        if wq is not None and in_q is not None:
            fan_in = getattr(module.parametrizations, tensor).original[0].numel()
            acc = wq.spec.bits + in_q.spec.bits + math.ceil(math.log2(fan_in))
        rows.append(
            LayerStats(
                name=name,
                kind=_SHORT.get(kind, kind),
                weight=describe(wq.spec if wq is not None else None),
                scale_min=float(wq.scale.min()) if wq is not None else None,
                scale_max=float(wq.scale.max()) if wq is not None else None,
                weight_sqnr=w_sqnr,
                output_scale=float(out_q.scale.max()) if out_q is not None else None,
                output_sqnr=sqnr(want[name], got[name]),
                accumulator_bits=acc,
                output="none" if out_q is None else placements.get(name, "layer output"),
            )
        )
    return rows


def format_layers(rows: list[LayerStats]) -> str:
    """The rows as a fixed-width table for the terminal."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = (
        f"{'layer':<24} {'type':<8} {'weight':<9} {'weight scales':>21} {'W SQNR dB':>9} "
        f"{'out scale':>9} {'out SQNR dB':>11} {'acc bits':>8}  output quantizer"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        scales = "-" if r.scale_min is None else f"{r.scale_min:.2e} .. {r.scale_max:.2e}"
        lines.append(
            f"{r.name:<24} {r.kind:<8} {r.weight:<9} {scales:>21} "
            f"{num(r.weight_sqnr, '.1f'):>9} {num(r.output_scale, '.4f'):>9} "
            f"{num(r.output_sqnr, '.1f'):>11} {num(r.accumulator_bits, 'd'):>8}  {r.output}"
        )
    return "\n".join(lines)
