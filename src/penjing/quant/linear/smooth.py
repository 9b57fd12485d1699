"""SmoothQuant-style smoothing (Xiao et al., ICML 2023): move activation outliers into the
weights before static INT8, so a per-tensor activation scale wastes fewer levels.

A transformer's LayerNorm output X has a few channels far wider than the rest, and the
Linear reading it quantizes X with one scale per tensor: those channels set the scale and
the others keep a handful of levels. The weights are quantized per output row, so they can
take some of that spread. For input channel j, with max|Xⱼ| seen on calibration data and
max|Wⱼ| the largest weight of column j over every Linear reading X,

    sⱼ = max|Xⱼ|^α / max|Wⱼ|^(1-α),    X·Wᵀ = (X / s)·(W · s)ᵀ,

so the float function is unchanged while the Linear's input ranges flatten to
max|Xⱼ|/sⱼ = (max|Xⱼ| · max|Wⱼ|)^(1-α): α = 1 puts every input channel at 1 and all the
spread in the weights, α = 0 moves the weights' spread into the inputs, 0.5 splits it.

Where 1/s goes. When the LayerNorm's output reaches nothing but those Linears (pre-LN
models), 1/s is folded into the LayerNorm's weight and bias: no op is added. In a post-LN
model (BERT) the same output is also the residual stream, so folding would change the
function; there each Linear is wrapped in `ScaledInput`, one element-wise Mul by 1/s ahead
of it (and ahead of its input quantizer; the Linear's weights move to `<name>.linear`).
Which case holds is checked, not assumed: the fold is tried, the model is run on a
calibration batch, and a changed output undoes it.

Pairs are found by running the model: a Linear is paired with the LayerNorm whose output
tensor (the same object, also through eval-mode dropout) it receives as input, on every
call. Run `smooth_` on the float model, then quantize (`ptq`, `dynamic`).

>>> pj.quant.smooth_(model, calib_loader, alpha=0.5)
>>> q = pj.quant.ptq(model, calib_loader, pj.quant.int8())
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing import inputs
from penjing.core import history
from penjing.core.steps import Step

_EPS = 1e-5  # floor for ranges and scales: a dead channel must not give s = 0 or inf
_SAME = 1e-4  # fold check: largest output change allowed, relative to the output's range


@dataclass
class Smoothing:
    """One LayerNorm and the Linears reading its output, smoothed with one scale."""

    norm: str
    linears: tuple[str, ...]
    scale: torch.Tensor  # s per input channel: inputs divided by it, weight columns times it
    folded: bool  # 1/s in the LayerNorm (True) or a ScaledInput ahead of each Linear


class ScaledInput(nn.Module):
    """`linear(x · inverse)`: a smoothed Linear whose 1/s could not be folded into the
    LayerNorm before it (that output also feeds a residual). Exports to ONNX as one Mul."""

    def __init__(self, linear: nn.Module, inverse: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("inverse", inverse.detach().float().clone())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.linear(x * self.inverse, *args, **kwargs)


@dataclass
class _Seen:
    """What one calibration pass saw: per-channel max |output| of each LayerNorm, and for
    each Linear the LayerNorm that produced its input on each call (None: something else)."""

    absmax: dict[str, torch.Tensor]
    sources: dict[str, set[str | None]]


@torch.no_grad()
def _observe(model: nn.Module, loader: Iterable, batches: int | None) -> tuple[_Seen, object]:
    """Run `loader` through `model` with hooks on every LayerNorm and Linear; return what
    they saw and the first batch's inputs (for the fold check)."""
    modules = dict(model.named_modules())
    seen = _Seen({}, {})
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (LayerNorm, output)

    def after_norm(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)  # the tensor is kept, so its id stays unique
                peak = out.detach().abs().float().reshape(-1, out.shape[-1]).amax(0)
                old = seen.absmax.get(name)
                seen.absmax[name] = peak if old is None else torch.maximum(old, peak)
        return hook

    def before_linear(name):
        def hook(module, args):
            hit = produced.get(id(args[0])) if args else None
            source = hit[0] if hit is not None and hit[1] is args[0] else None
            seen.sources.setdefault(name, set()).add(source)
        return hook

    handles = []
    for name, m in modules.items():
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            handles.append(m.register_forward_hook(after_norm(name)))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(before_linear(name)))
    first, count = None, 0
    try:
        for batch in itertools.islice(loader, batches):
            batch_inputs = inputs.from_batch(batch, model)
            first = batch_inputs if first is None else first
            inputs.call(model, batch_inputs)
            produced.clear()
            count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("smooth_ needs at least one calibration batch, got an empty loader; "
                         "pass the loader you calibrate quantization with")
    return seen, first


def _groups(model: nn.Module, seen: _Seen) -> dict[str, list[str]]:
    """{LayerNorm: [Linears that read its output on every call]}, in model order."""
    groups: dict[str, list[str]] = {}
    for name, sources in seen.sources.items():
        if len(sources) == 1 and None not in sources:
            groups.setdefault(next(iter(sources)), []).append(name)
    if not groups:
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        why = ("it has no nn.LayerNorm" if not norms else "it has no nn.Linear" if not linears
               else f"none of its {len(linears)} Linear layers reads the output of one of its "
               f"{len(norms)} LayerNorms directly on every call")
        raise ValueError(
            f"smooth_ found no LayerNorm -> Linear pair in {type(model).__name__}: {why}; "
            "smoothing needs a LayerNorm whose output a Linear reads (as in transformer "
            "blocks), so quantize this model without it"
        )
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return {n: sorted(groups[n], key=order.get) for n in sorted(groups, key=order.get)}


def _check_linear(name: str, linear: nn.Module) -> None:
    if parametrize.is_parametrized(linear):
        raise ValueError(
            f"layer {name!r} has parametrized weights (pruning mask or fake quantization); "
            "smooth_ rescales plain float weights: smooth before pruning masks or quantizing, "
            "or finalize_ them first"
        )


def _output(model: nn.Module, batch_inputs) -> torch.Tensor:
    return inputs.first_tensor(inputs.call(model, batch_inputs)).detach().float()


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((out - ref).abs().max() <= _SAME * ref.abs().max().clamp_min(1e-12))


@torch.no_grad()
def smooth_(
    model: nn.Module,
    loader: Iterable,
    alpha: float = 0.5,
    *,
    batches: int | None = None,
) -> list[Smoothing]:
    """Smooth every LayerNorm -> Linear pair of `model` in place (SmoothQuant, see the
    module docstring); return what was changed, one `Smoothing` per LayerNorm.

    `loader` gives calibration batches (a tensor, a dict of keyword tensors or (inputs,
    labels), as `ptq` takes them), of which the first `batches` are used (all by default).
    `alpha` in [0, 1] is how much of the activations' spread moves into the weights.
    A model without a LayerNorm -> Linear pair is an error, not a silent no-op.

    >>> done = pj.quant.smooth_(bert, calib, alpha=0.5)   # then pj.quant.ptq(bert, ...)
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1] (0.5 as in SmoothQuant), got "
                         f"{alpha!r}")
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be >= 1 or None, got {batches}")
    was_training = model.training
    model.eval()
    try:
        seen, first = _observe(model, loader, batches)
        groups = _groups(model, seen)
        modules = dict(model.named_modules())
        for names in groups.values():
            for name in names:
                _check_linear(name, modules[name])
        reference = _output(model, first)
        done, wrapped = [], []
        for norm_name, names in groups.items():
            norm, linears = modules[norm_name], [modules[n] for n in names]
            x_max = seen.absmax[norm_name].clamp_min(_EPS)
            w_max = torch.stack([m.weight.detach().abs().amax(0) for m in linears]).amax(0)
            scale = (x_max.pow(alpha) / w_max.float().clamp_min(_EPS).pow(1 - alpha))
            scale = scale.clamp_min(_EPS)
            for m in linears:
                m.weight.mul_(scale.to(m.weight.dtype))
            folded = _fold(model, norm, scale, first, reference)
            if not folded:
                for name, m in zip(names, linears, strict=True):
                    model.set_submodule(name, ScaledInput(m, 1 / scale))
                    wrapped.append(name)
            done.append(Smoothing(norm_name, tuple(names), scale, folded))
    finally:
        model.train(was_training)
    if wrapped:  # a model file rebuilds the wrappers; their 1/s comes with the weights
        history.record(model, {"op": "smooth", "layers": wrapped})
    return done


def replay_smooth_(model: nn.Module, layers: list[str]) -> None:
    """Wrap the named Linear layers of `model` in `ScaledInput` (1/s of ones until the
    saved state is loaded): the "smooth" step of a model file's history."""
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"a 'smooth' step needs a non-empty list of layers, got {layers!r}")
    for name in layers:
        module = model.get_submodule(name) if isinstance(name, str) else None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"a 'smooth' step names {name!r}, which is not a Linear layer "
                             f"of {type(model).__name__}")
        model.set_submodule(name, ScaledInput(module, torch.ones(module.in_features)))


def _fold(model: nn.Module, norm: nn.LayerNorm, scale: torch.Tensor, first, reference
          ) -> bool:
    """Divide `norm`'s weight and bias by `scale` and keep that if the model's output on
    `first` stays `reference`; otherwise undo it and return False."""
    if norm.weight is None:
        return False  # nothing to fold into
    saved = [p.detach().clone() for p in (norm.weight, norm.bias) if p is not None]
    for p in (norm.weight, norm.bias):
        if p is not None:
            p.div_(scale.to(p.dtype))
    if _same(_output(model, first), reference):
        return True
    for p, old in zip([p for p in (norm.weight, norm.bias) if p is not None], saved,
                      strict=True):
        p.copy_(old)
    return False


STEP = Step(
    "smooth", history.replaying(lambda m, step: replay_smooth_(m, step["layers"])),
    structural=True, help="Linear inputs scaled before quantization (penjing.quant.smooth_)",
)
