"""AWQ (Lin et al., 2024): activation-aware weight quantization.

A few input channels of each layer carry much larger activations than the rest, and the
rounding error of their weights costs the most output error. AWQ multiplies those weight
columns by a per-channel scale s before rounding, and divides the layer's input by s, so
that the salient weights use more of the integer grid. The division is folded into the op
that produces the input (a norm's weight, or the rows of the Linear before it), so the
model keeps its shape and every quantized layer is an ordinary grid of integers.

The scale is s = a^α, a each input channel's RMS on calibration text, with α chosen from a
grid to minimise the output error of the layers that read that input; every layer then
gets a clipping ratio per row, chosen the same way. Both errors are exact quadratic forms
in the layer's input Hessian, ‖(W − Ŵ)X‖² = tr(ΔHΔᵀ), so the search runs no forward passes.

Folding targets found: a norm whose output is a layer's input as it is (Llama's
input_layernorm → q/k/v, post_attention_layernorm → gate/up; OPT's LayerNorms), and the
up projection of a gated MLP (up_proj → down_proj). A layer whose input comes from
anything else (o_proj after attention) is only clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from penjing.core.layerwise import (
    LayerStats,
    compress_blocks_,
    is_linear,
    set_weight_matrix_,
    weight_matrix,
)
from penjing.errors import UnsupportedLayerError
from penjing.layers import as_filter
from penjing.quant.gptq import attach_grid_, check_grid, grid_spec
from penjing.quant.linear.primitives import QuantSpec, qparams

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))  # 1.0 down to 0.55


@dataclass(frozen=True)
class AWQConfig:
    """Activation-aware weight quantization on calibration data (`pj.quant.quantize_(model,
    AWQConfig(4, 128), calib=batches)`)."""

    bits: int = 4
    group_size: int | None = 128  # input columns per scale; None: one scale per row
    symmetric: bool = False
    grid: int = 20  # α values tried, evenly spaced in [0, 1)
    clip: bool = True  # then a clipping ratio per row, from 1.0 down to 0.55
    layers: Sequence[str] | Callable[[nn.Module, str], bool] | None = None
    batches: int | None = None  # calibration batches used (None: all)

    def __post_init__(self) -> None:
        check_grid(self.bits, self.group_size)
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be a positive int (α values tried), got {self.grid!r}")

    @property
    def spec(self) -> QuantSpec:
        """The integer format of the weights (the fake quantizer's spec)."""
        return grid_spec(self.bits, self.group_size, self.symmetric)


def round_to_grid(w: torch.Tensor, spec: QuantSpec, group_size: int | None,
                  ratio: torch.Tensor | float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values on the grid, scale, zero point) of an (out, in) matrix, each group's range
    shrunk by `ratio` (a float, or one per row). Scale and zero point are (out, groups)."""
    rows, cols = w.shape
    size = group_size or cols
    pad = (-cols) % size
    grouped = nn.functional.pad(w, (0, pad)).reshape(rows, -1, size)
    if pad:  # the padding must not widen the last group's range
        last = grouped[:, -1, : size - pad]
        grouped[:, -1, size - pad:] = last[:, :1]
    ratio = torch.as_tensor(ratio, dtype=w.dtype).reshape(-1, 1)
    scale, zero = qparams(grouped.amin(dim=2) * ratio, grouped.amax(dim=2) * ratio, spec)
    q = (torch.round(grouped / scale[..., None]) + zero[..., None]).clamp(spec.qmin, spec.qmax)
    values = ((q - zero[..., None]) * scale[..., None]).reshape(rows, -1)[:, :cols]
    return values, scale, zero


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """‖ΔX‖² per row, from H = XᵀX / tokens."""
    return ((delta @ h) * delta).sum(dim=1)


def _producers(chosen: dict[str, nn.Module], run: Callable[..., None], root: nn.Module
               ) -> dict[str, tuple[str, nn.Module]]:
    """For each chosen layer whose input can take a per-channel division, the module that
    produces that input, as (name, module)."""
    names = {id(m): n for n, m in root.named_modules()}
    # (kind, module id, tensor) in call order; holding the tensors keeps their ids unique
    # while the block runs, so a tensor is matched by identity, never by a reused address
    events: list[tuple[str, int, torch.Tensor]] = []
    handles = []
    for module in root.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter) \
                and weight.dim() == 1 and not list(module.children()):
            handles.append(module.register_forward_hook(
                lambda m, _a, out: events.append(("norm", id(m), out))
                if isinstance(out, torch.Tensor) else None))
        if is_linear(module):  # every Linear: one left out must not see a changed input
            handles.append(module.register_forward_pre_hook(
                lambda m, args: events.append(("layer", id(m), args[0]))))
    try:
        run(1)
    finally:
        for h in handles:
            h.remove()
    found: dict[str, tuple[str, nn.Module]] = {}
    by_id = {id(m): (n, m) for n, m in root.named_modules()}
    chosen_ids = {id(m) for m in chosen.values()}
    written: dict[int, int] = {}  # id of a norm's output tensor -> that norm's id
    unsafe = set()  # norms read by a Linear that is not quantized here
    for kind, who, tensor in events:
        if kind == "norm":
            written[id(tensor)] = who
        elif id(tensor) in written:
            if who in chosen_ids:
                found.setdefault(names[who], by_id[written[id(tensor)]])
            else:
                unsafe.add(written[id(tensor)])
    found = {n: p for n, p in found.items() if id(p[1]) not in unsafe}
    for name, layer in chosen.items():  # a gated MLP: down(act(gate(x)) * up(x))
        parent = root.get_submodule(names[id(layer)].rpartition(".")[0]) \
            if "." in names[id(layer)] else root
        up = getattr(parent, "up_proj", None)
        if names[id(layer)].endswith("down_proj") and isinstance(up, nn.Linear) \
                and hasattr(parent, "gate_proj") and up.out_features == layer.in_features:
            found[name] = (names[id(up)], up)
    return found


@torch.no_grad()
def _fold_(producer: nn.Module, s: torch.Tensor) -> bool:
    """Divide what `producer` outputs by `s`, channel by channel; False (and nothing
    changed) when the module does not scale that way (a norm computing x̂·(1 + w))."""
    saved = {k: v.detach().clone() for k, v in producer.named_parameters()}
    width = producer.in_features if isinstance(producer, nn.Linear) else s.numel()
    probe = torch.randn(4, width, generator=torch.Generator().manual_seed(0),
                        dtype=producer.weight.dtype)
    before = producer(probe)
    rows = s.to(producer.weight.dtype)
    producer.weight.div_(rows.unsqueeze(1) if isinstance(producer, nn.Linear) else rows)
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(rows)
    after = producer(probe)
    if torch.allclose(after * rows, before, rtol=1e-4, atol=1e-5 * float(before.abs().max())):
        return True
    for k, v in producer.named_parameters():
        v.copy_(saved[k])
    return False


def _search_scale(weights: list[torch.Tensor], h: torch.Tensor, stats: LayerStats,
                  config: AWQConfig) -> tuple[torch.Tensor, float]:
    """(s, α) minimising the summed output error of `weights` that read one input."""
    spec = config.spec
    rms = (stats.sq_norms / max(stats.tokens, 1)).sqrt().float()
    rms = rms.clamp_min(float(rms.max()) * 1e-5 + 1e-12)
    best = (float("inf"), torch.ones_like(rms), 0.0)
    for k in range(config.grid):
        alpha = k / config.grid
        s = rms.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w in weights:
            q, _, _ = round_to_grid(w * s, spec, config.group_size)
            error += float(_output_error(w - q / s, h).sum())
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def _clip_and_round(w: torch.Tensor, h: torch.Tensor, config: AWQConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round `w` to the grid with the clipping ratio per row that gives the least output
    error (ratio 1.0, no clipping, when `config.clip` is off)."""
    spec = config.spec
    best_q, best_scale, best_zero = round_to_grid(w, spec, config.group_size)
    if not config.clip:
        return best_q, best_scale, best_zero
    best_error = _output_error(w - best_q, h)
    for ratio in CLIP_RATIOS[1:]:
        q, scale, zero = round_to_grid(w, spec, config.group_size, ratio)
        error = _output_error(w - q, h)
        better = error < best_error
        best_q[better], best_scale[better], best_zero[better] = q[better], scale[better], \
            zero[better]
        best_error = torch.minimum(error, best_error)
    return best_q, best_scale, best_zero


def _awq_block(chosen: dict[str, nn.Module], stats: dict[str, LayerStats],
               run: Callable[..., None], root: nn.Module, config: AWQConfig
               ) -> dict[str, dict]:
    for name, layer in chosen.items():
        if not isinstance(layer, nn.Linear):
            raise UnsupportedLayerError(
                f"layer {name!r} is a {type(layer).__name__}; AWQ stores nn.Linear weights "
                "(transformers' Conv1D of GPT-2 stores them transposed): leave it out with "
                "layers=")
    producers = _producers(chosen, run, root)
    weights = {name: weight_matrix(layer).float().clone() for name, layer in chosen.items()}
    hessians = {name: stats[name].hessian.float() for name in chosen}
    groups: dict[str, list[str]] = {}  # producer name -> the layers reading its output
    for name, (producer_name, _) in producers.items():
        groups.setdefault(producer_name, []).append(name)
    scales = {}  # searched on the weights as they are, before any fold
    for producer_name, readers in groups.items():
        first = readers[0]
        scales[producer_name] = _search_scale([weights[r] for r in readers],
                                              hessians[first], stats[first], config)
    alphas: dict[str, float] = {}
    folded: dict[str, str] = {}
    for producer_name, readers in groups.items():
        s, alpha = scales[producer_name]
        if alpha == 0.0 or not _fold_(producers[readers[0]][1], s):
            continue
        if producer_name in weights:  # a Linear of this block: its own rows change too
            weights[producer_name] /= s.unsqueeze(1)
        for r in readers:  # the readers see x / s: W·s, and H of x / s
            weights[r] = weights[r] * s
            hessians[r] = hessians[r] / s.unsqueeze(0) / s.unsqueeze(1)
            alphas[r], folded[r] = alpha, producer_name
    done = {}
    for name, layer in chosen.items():
        w, h = weights[name], hessians[name]
        q, scale, zero = _clip_and_round(w, h, config)
        set_weight_matrix_(layer, q)
        error = float(_output_error(w - q, h).sum()) / max(w.shape[0], 1)
        scale, zero = (scale[:, 0], zero[:, 0]) if config.group_size is None else (scale, zero)
        done[name] = {"error": error, "scale": scale, "zero": zero.to(torch.int32),
                      "alpha": alphas.get(name, 0.0), "folded_into": folded.get(name)}
    return done


def awq_(model: nn.Module, calib: Iterable, config: AWQConfig,
         progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Quantize the weights of `model` with AWQ on `calib`, block by block, in place.

    Returns, by layer, its output error on the calibration inputs (‖(W − Ŵ)X‖² per row and
    token, in the scaled space it is stored in), the α chosen and the module its scale was
    folded into (None: clipped only). The weights then carry the fake quantizer weight-only
    quantization puts on, with AWQ's scales, recorded in the model's history.
    """
    chosen = as_filter(model, config.layers)
    done = compress_blocks_(
        model, calib, block_method=lambda c, s, run: _awq_block(c, s, run, model, config),
        layers=chosen, batches=config.batches, progress=progress)
    attach_grid_(model, done, config.spec)
    return {name: {k: d[k] for k in ("error", "alpha", "folded_into")}
            for name, d in done.items()}
