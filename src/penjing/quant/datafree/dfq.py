"""Data-free quantization (Nagel et al., ICCV 2019): equalize, absorb high biases, quantize,
then correct the bias that weight quantization shifts.

Quantizing W to W̃ = W + ε moves a layer's expected output by ε·E[x]. Bias correction
subtracts that shift from the layer's bias:

- *analytic* (no data): E[x] per input channel from the BatchNorm folded into the layer
  before — its pre-activation is about N(β, γ²), and for x ~ N(μ, σ²) clipped to
  [0, u] the mean is g(μ) − g(μ − u) with g(m) = m·Φ(m/σ) + σ·φ(m/σ). Layers whose input
  has no such statistics (the first layer, the sum of a residual) are left as they are.
- *empirical* (with data): the mean difference of each quantized layer's output from the
  float model's, per channel, over a few batches.

`dfq(model)` runs the whole recipe and returns a quantized model that exports to ONNX like
any PTQ model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import fx, nn

from penjing import inputs
from penjing.quant.datafree.equalize import (
    ChannelClip,
    Equalization,
    LayerStats,
    _label,
    _passes,
    _repeat,
    equalize,
    input_response,
)
from penjing.quant.linear.config import QuantConfig, int8
from penjing.quant.linear.fakequant import get_weight_quant
from penjing.quant.linear.ptq import calibrate_, freeze_, prepare

BIAS_CORRECTIONS = ("analytic", "empirical")


def _clipped_mean(mu: torch.Tensor, sigma: torch.Tensor, lower: torch.Tensor,
                  upper: torch.Tensor) -> torch.Tensor:
    """E[clamp(x, lower, upper)] for x ~ N(mu, sigma²), lower finite (0 after absorption)."""
    sigma = sigma.clamp_min(1e-12)

    def g(m: torch.Tensor) -> torch.Tensor:  # E[max(0, x + m - mu)] for the shifted normal
        z = m / sigma
        return m * torch.special.ndtr(z) + sigma * torch.exp(-0.5 * z * z) / math.sqrt(
            2 * math.pi)

    mean = lower + g(mu - lower)
    finite = torch.isfinite(upper)
    capped = mean - g(torch.where(finite, mu - upper, torch.full_like(mu, -1e30)))
    return torch.where(finite, capped, mean)


def input_means(gm: fx.GraphModule, stats: dict[str, LayerStats]) -> dict[str, torch.Tensor]:
    """{layer: E[input] per input channel} for the layers of `gm` whose input is another
    layer's output through a ReLU-family activation (or none) and mean-keeping ops, where
    that layer has BatchNorm statistics."""
    means = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            continue
        value, act = node.args[0], None
        while True:
            if value.op == "call_module" and isinstance(
                    gm.get_submodule(value.target), nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                break
            found = _label(gm, value)
            if found is not None and act is None and found[0] != "leaky_relu":
                act = (value, *found)
            elif found is not None or not _passes(gm, value, mean=True):
                value = None
                break
            if not value.args or not isinstance(value.args[0], fx.Node):
                value = None
                break
            value = value.args[0]
        if value is None or value.target not in stats:
            continue
        s = stats[value.target]
        if act is None:
            mean = s.mean
        else:
            act_node, label, upper = act
            if label == "clip":
                clip = gm.get_submodule(act_node.target)
                lo, hi = clip.lower.reshape(-1), clip.upper.reshape(-1)
            else:
                lo, hi = torch.zeros_like(s.mean), torch.full_like(s.mean, upper)
            mean = _clipped_mean(s.mean, s.std, lo, hi)
        if _repeat(mean, layer).numel() == (layer.in_features if isinstance(layer, nn.Linear)
                                           else layer.in_channels):
            means[node.target] = _repeat(mean, layer)
    return means


@torch.no_grad()
def correct_bias_analytic_(quantized: nn.Module, means: dict[str, torch.Tensor]) -> list[str]:
    """Subtract ε·E[x] from the bias of each weight-quantized layer named in `means`
    (E[x] per input channel, see `input_means`); return the layers corrected."""
    modules = dict(quantized.named_modules())
    done = []
    for name, mean in means.items():
        layer = modules.get(name)
        wq = get_weight_quant(layer) if layer is not None else None
        if wq is None:
            continue
        w = layer.parametrizations.weight.original
        error = layer.weight - w
        shift = input_response(error, getattr(layer, "groups", 1), mean)
        _add_bias_(layer, -shift)
        done.append(name)
    return done


def _add_bias_(layer: nn.Module, delta: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(delta.clone())
    else:
        layer.bias.data.add_(delta)


@torch.no_grad()
def correct_bias_empirical_(
    quantized: nn.Module, reference: nn.Module, loader: Iterable, batches: int | None = 8
) -> list[str]:
    """Subtract from each weight-quantized layer's bias the mean per-channel difference
    of its output from the same layer in `reference` (the float model it was made from,
    same module names) over `batches` batches of `loader`; return the layers corrected.

    Layers are corrected in forward order within each batch (a layer's shift is measured
    with the layers before it already corrected), so shifts do not pile up downstream."""
    q_layers = {n: m for n, m in quantized.named_modules() if get_weight_quant(m) is not None}
    f_modules = dict(reference.named_modules())
    names = [n for n in q_layers if n in f_modules]
    target: dict[str, torch.Tensor] = {}
    shift: dict[str, torch.Tensor] = {n: torch.zeros(()) for n in names}

    def channel_mean(output: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(output.dim()) if d != 1] if output.dim() > 2 else [0]
        return output.double().mean(dims)

    def observe(name: str):
        def record(module, args, output):  # noqa: ANN001 - hook signature
            target[name] = channel_mean(output)
        return record

    def correct(name: str):
        def apply(module, args, output):  # noqa: ANN001 - hook signature
            diff = channel_mean(output) - target[name]
            shift[name] = shift[name] + diff
            shape = (1, -1) + (1,) * (output.dim() - 2) if output.dim() > 2 else (1, -1)
            return output - diff.to(output.dtype).reshape(shape)
        return apply

    handles = [f_modules[n].register_forward_hook(observe(n)) for n in names]
    handles += [q_layers[n].register_forward_hook(correct(n)) for n in names]
    seen = 0
    try:
        for batch in itertools.islice(loader, batches):
            x = inputs.from_batch(batch, reference)
            inputs.call(reference, x)
            inputs.call(quantized, x)
            seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("empirical bias correction needs at least one batch, got an empty "
                         "loader; pass a few batches of inputs, or use 'analytic'")
    for name in names:
        _add_bias_(q_layers[name], -(shift[name] / seen).float())
    return names


def dfq(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    calib_loader: Iterable | None = None,
    bias_correction: str | None = "analytic",
    equalization: bool = True,
    absorb: bool = True,
    batches: int | None = 8,
) -> nn.Module:
    """Data-free quantization: a quantized copy of `model` after cross-layer equalization,
    high-bias absorption and bias correction (per-tensor INT8 weights by default).

    `bias_correction` is 'analytic' (BatchNorm statistics, no data), 'empirical' (needs
    `calib_loader`) or None. Activations are quantized when `config` says so; their ranges
    need `calib_loader` (`batches` batches). Equalization and absorption need no data.

    >>> q = pj.quant.dfq(model, pj.quant.int8(per_channel=False, activation=None))
    """
    config = config or int8(per_channel=False, activation=None)
    if bias_correction not in (*BIAS_CORRECTIONS, None):
        raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS} or None, got "
                         f"{bias_correction!r}")
    if bias_correction == "empirical" and calib_loader is None:
        raise ValueError("empirical bias correction needs data: pass calib_loader, or use "
                         "bias_correction='analytic' (BatchNorm statistics)")
    if config.activation is not None and calib_loader is None:
        raise ValueError(
            "quantizing activations needs their ranges: pass calib_loader, or quantize "
            "weights only (activation=None) to stay data-free")
    if equalization:
        float_model, info = equalize(model, absorb=absorb)
    else:
        float_model, info = equalize(model, pairs=[], absorb=False)
    if bias_correction == "analytic" and not info.stats:
        raise ValueError(
            f"analytic bias correction needs BatchNorm statistics, but {type(model).__name__} "
            "has no BatchNorm after a conv or linear layer; pass data and use "
            "bias_correction='empirical', or bias_correction=None")
    q = prepare(float_model, config)
    if config.activation is not None:
        calibrate_(q, calib_loader, batches)
        freeze_(q)
    if bias_correction == "analytic":
        corrected = correct_bias_analytic_(q, input_means(float_model, info.stats))
        if not corrected:
            raise ValueError(
                "analytic bias correction found no quantized layer whose input comes from a "
                "BatchNorm-folded layer through a ReLU-family activation; use 'empirical'")
    elif bias_correction == "empirical":
        correct_bias_empirical_(q, float_model, calib_loader, batches)
    return q


__all__ = [
    "BIAS_CORRECTIONS",
    "ChannelClip",
    "Equalization",
    "correct_bias_analytic_",
    "correct_bias_empirical_",
    "dfq",
    "input_means",
]
