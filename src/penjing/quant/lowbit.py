"""Binary, ternary and power-of-two weights, trained with the straight-through estimator.

- BinaryConnect (Courbariaux et al., 2015): w_b = sign(w).
- BWN (Rastegari et al., 2016): w_b = α·sign(w), α = mean|W| per output channel (the
  scale that minimises ‖W − α·sign(W)‖²).
- XNOR-Net: BWN weights and binary inputs sign(x), with the input scale K: the mean of
  |x| over channels, averaged over each kernel window (a scalar per sample for a linear
  layer), so that conv(x, W) ≈ conv(sign(x), sign(W))·K·α.
- TWN (Li & Liu, 2016): w_t = α·sign(w)·[|w| > Δ], Δ = 0.7·mean|W| and α the mean |w|
  over the survivors, per output channel.
- Logarithmic weights and INQ (Zhou et al., 2017): weights in {0, ±2^k}, k from n₁ =
  ⌊log₂(4·max|W|/3)⌋ down over 2^(bits−2) exponents; INQ quantizes a growing share of
  each layer's weights (largest magnitude first) and retrains the rest in between.

Each is a parametrization on `weight` (the float weight stays the trained Parameter, the
forward sees the quantized one, the gradient passes straight through), so a model stays a
normal nn.Module that trains and, once `finalize_`d, saves: `penjing.codec.save` stores
binary / ternary rows packed (1 or 2 bits plus a scale per row) and power-of-two weights
as codes into a codebook of at most 2^(bits−1) + 1 values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from penjing.layers import as_filter
from penjing.train import fit

# None: every Linear and Conv; module names; or a filter fn(module, name) -> bool
Layers = Sequence[str] | Callable[[nn.Module, str], bool] | None

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BINARY_METHODS = ("binaryconnect", "bwn", "xnor")
INQ_SCHEDULE = (0.5, 0.75, 0.875, 1.0)


def _per_channel(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (w.dim() - 1)))


def _sign(w: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so every weight is ±1."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def binarize(w: torch.Tensor, scaled: bool = True) -> torch.Tensor:
    """α·sign(w) with α = mean|w| per output channel (BWN), or sign(w) (BinaryConnect)."""
    if not scaled:
        return _sign(w)
    alpha = w.detach().abs().reshape(w.shape[0], -1).mean(1) if w.dim() > 1 else (
        w.detach().abs().mean().reshape(1))
    return _per_channel(w, alpha) * _sign(w)


def ternary_threshold(w: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """Δ per output channel: `threshold`·mean|w| (TWN's approximation of the optimum)."""
    rows = w.detach().abs().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().abs()[None]
    return threshold * rows.mean(1)


def ternarize(w: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """α·sign(w)·[|w| > Δ] per output channel, α = mean |w| of the survivors."""
    delta = _per_channel(w, ternary_threshold(w, threshold))
    keep = (w.detach().abs() > delta).to(w.dtype)
    rows = (w.detach().abs() * keep).reshape(w.shape[0], -1) if w.dim() > 1 else (
        (w.detach().abs() * keep)[None])
    count = keep.reshape(rows.shape).sum(1)
    alpha = torch.where(count > 0, rows.sum(1) / count.clamp_min(1), torch.zeros_like(count))
    return _per_channel(w, alpha) * _sign(w) * keep


def log2_exponents(w: torch.Tensor, bits: int) -> tuple[int, int]:
    """(n₂, n₁): the smallest and largest exponent of INQ's levels for `w` at `bits` bits."""
    check_log2_bits(bits)
    top = float(w.detach().abs().max())
    if top == 0 or not math.isfinite(top):
        raise ValueError(f"power-of-two levels need a finite non-zero weight, got max|w| = {top}")
    n1 = math.floor(math.log2(4 * top / 3))
    return n1 - 2 ** (bits - 2) + 1, n1


def check_log2_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"power-of-two bits must be an int in 2..8 (one bit for the sign, "
                         f"2^(bits-2) exponents and zero), got {bits!r}")


def log2_quantize(w: torch.Tensor, exponents: tuple[int, int]) -> torch.Tensor:
    """Each weight to the nearest of {0, ±2^n₂, …, ±2^n₁} (linear distance)."""
    n2, n1 = exponents
    levels = torch.tensor([0.0] + [2.0**k for k in range(n2, n1 + 1)], dtype=w.dtype)
    mag = w.detach().abs().clamp_max(float(levels[-1]))
    index = torch.bucketize(mag, (levels[1:] + levels[:-1]) / 2)
    return levels[index] * _sign(w)


class _Through(torch.autograd.Function):
    """Forward: exactly `q` (w + (q − w) would round off the values the codec stores);
    backward: the gradient to `x`, zeroed outside [−limit, limit] when a limit is given."""

    @staticmethod
    def forward(ctx, x, q, limit):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(x)
        ctx.limit = limit
        return q.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        (x,) = ctx.saved_tensors
        if ctx.limit is not None:
            grad = grad * (x.abs() <= ctx.limit).to(grad.dtype)
        return grad, None, None


class _STE(nn.Module):
    """Parametrization: forward sees quantize(w), the gradient reaches w unchanged."""

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _Through.apply(w, self.quantize(w.detach()), None)


class BinaryWeight(_STE):
    """sign(w), scaled by mean|w| per output channel when `scaled` (BWN)."""

    def __init__(self, scaled: bool = True) -> None:
        super().__init__()
        self.scaled = scaled

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return binarize(w, self.scaled)

    def extra_repr(self) -> str:
        return f"scaled={self.scaled}"


class TernaryWeight(_STE):
    """TWN: {−α, 0, +α} per output channel with Δ = threshold·mean|w|."""

    def __init__(self, threshold: float = 0.7) -> None:
        super().__init__()
        if not 0 < threshold < 2:
            raise ValueError(f"ternary threshold must be in (0, 2) (TWN uses 0.7), got "
                             f"{threshold!r}")
        self.threshold = threshold

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return ternarize(w, self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class Log2Weight(nn.Module):
    """Weights in {0, ±2^k}: the share marked in `frozen` holds its power-of-two value
    (INQ's quantized part, no gradient); the rest stays float and trains."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.exponents = log2_exponents(weight, bits)
        self.register_buffer("frozen", torch.zeros_like(weight, dtype=torch.bool))
        self.register_buffer("values", torch.zeros_like(weight))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.frozen, self.values, w)

    @torch.no_grad()
    def freeze_(self, w: torch.Tensor, fraction: float) -> int:
        """Quantize and freeze the largest-magnitude free weights until exactly
        round(fraction·numel) are frozen; return how many were added."""
        target = round(fraction * w.numel())
        add = target - int(self.frozen.sum())
        if add <= 0:
            return 0
        score = w.detach().abs().masked_fill(self.frozen, -1.0).reshape(-1)
        chosen = torch.topk(score, add).indices
        flat_frozen, flat_values = self.frozen.view(-1), self.values.view(-1)
        flat_frozen[chosen] = True
        flat_values[chosen] = log2_quantize(w.reshape(-1)[chosen], self.exponents)
        return add

    def extra_repr(self) -> str:
        return f"bits={self.bits}, exponents={self.exponents}"


def _layers(model: nn.Module, layers: Layers, first: bool, last: bool
            ) -> list[tuple[str, nn.Module]]:
    chosen = as_filter(model, layers)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)
             and (chosen is None or chosen(m, n))]
    if not found:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layer to quantize "
                         "(or layers chose none)")
    keep = [i for i in range(len(found))
            if (first or i != 0) and (last or i != len(found) - 1)]
    if not keep:
        raise ValueError("first=False and last=False leave no layer to quantize; "
                         "set first=True or last=True")
    return [found[i] for i in keep]


def _register(module: nn.Module, name: str, param: nn.Module) -> None:
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"layer {name!r} already has a parametrization on its weight "
                         "(a mask, fake quantization or shared weights); finalize_ it first")
    parametrize.register_parametrization(module, "weight", param)


def _check_xnor(layer: nn.Module, name: str = "") -> None:
    if type(layer).forward not in (nn.Conv1d.forward, nn.Conv2d.forward,
                                   nn.Conv3d.forward, nn.Linear.forward):
        raise TypeError(f"XNOR-Net inputs need a plain Linear/Conv forward, got "
                        f"{type(layer).__name__} {name!r} with its own")


class XnorInput:
    """The input half of XNOR-Net on one layer: a forward pre-hook that feeds sign(x)
    (straight-through inside [−1, 1]) and a forward hook that multiplies the output (less
    its bias) by K. `remove()` takes both hooks off."""

    def __init__(self, layer: nn.Module) -> None:
        _check_xnor(layer)
        self.layer, self.k = layer, None
        self.handles = [layer.register_forward_pre_hook(self.before),
                        layer.register_forward_hook(self.after)]

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """K: mean |x| over input channels, averaged over each kernel window."""
        a = x.abs().mean(1, keepdim=True)
        if isinstance(self.layer, nn.Linear):
            return a
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
        k = self.layer.kernel_size
        box = torch.ones(1, 1, *k, dtype=x.dtype) / math.prod(k)
        padding = self.layer.padding if isinstance(self.layer.padding, tuple | int) else 0
        return conv(a, box, None, self.layer.stride, padding, self.layer.dilation)

    def before(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        self.k = self.scale(x.detach())
        # sign(x) forward; gradient 1 inside [−1, 1] and 0 outside (the htanh STE)
        return (_Through.apply(x, _sign(x.detach()), 1.0), *args[1:])

    def after(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        bias = module.bias
        if bias is None:
            return out * self.k
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return (out - bias.reshape(shape)) * self.k + bias.reshape(shape)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass(frozen=True)
class BinaryConfig:
    """Binary weights (`pj.quant.quantize_`): 'binaryconnect' (sign), 'bwn' (α·sign) or
    'xnor' (BWN weights and binary inputs). First and last layers stay float unless
    `first` / `last`, as in the papers."""

    method: str = "bwn"
    layers: Layers = None
    first: bool = False
    last: bool = False

    def __post_init__(self) -> None:
        if self.method not in BINARY_METHODS:
            raise ValueError(f"method must be one of {list(BINARY_METHODS)}, got "
                             f"{self.method!r}")


@dataclass(frozen=True)
class TernaryConfig:
    """TWN ternary weights {−α, 0, +α} (`pj.quant.quantize_`); weights below
    `threshold`·mean|W| become 0."""

    threshold: float = 0.7
    layers: Layers = None
    first: bool = False
    last: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) \
                or not self.threshold > 0:
            raise ValueError(f"threshold must be a number > 0 (0.7 is TWN's), got "
                             f"{self.threshold!r}")


@dataclass(frozen=True)
class Log2Config:
    """Power-of-two weights {0, ±2^k} (`pj.quant.quantize_`): the largest `fraction` of
    each layer's weights now; `inq_step_` raises the share (INQ)."""

    bits: int = 5
    fraction: float = 1.0
    layers: Layers = None
    first: bool = True
    last: bool = True

    def __post_init__(self) -> None:
        check_log2_bits(self.bits)
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float) \
                or not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction!r}")


def binarize_(
    model: nn.Module,
    method: str = "bwn",
    *,
    layers: Layers = None,
    first: bool = False,
    last: bool = False,
) -> dict[str, BinaryWeight]:
    """Binary weights on the chosen layers, in place; train with `penjing.train.fit` (the
    STE passes gradients to the float weights), then `finalize_` to keep ±α.

    `method`: 'binaryconnect' (sign), 'bwn' (α·sign, α = mean|W| per output channel) or
    'xnor' (BWN weights and binary inputs with XNOR-Net's scale K). The first and last
    layers stay float unless `first` / `last`, as in the papers. Returns the weight
    parametrizations by layer name; for 'xnor' each one's `inputs` is its XnorInput.
    """
    if method not in BINARY_METHODS:
        raise ValueError(f"unknown binary method {method!r}; choose one of {BINARY_METHODS}")
    added = {}
    chosen = _layers(model, layers, first, last)
    for name, module in chosen:  # all checked first: a refused layer changes nothing
        if method == "xnor":
            _check_xnor(module, name)
        if parametrize.is_parametrized(module, "weight"):
            _register(module, name, None)  # raises, naming the layer
    for name, module in chosen:
        quant = BinaryWeight(scaled=method != "binaryconnect")
        _register(module, name, quant)
        added[name] = quant
        if method == "xnor":
            quant.inputs = XnorInput(module)
    return added


def ternarize_(
    model: nn.Module,
    threshold: float = 0.7,
    *,
    layers: Layers = None,
    first: bool = False,
    last: bool = False,
) -> dict[str, TernaryWeight]:
    """TWN ternary weights on the chosen layers, in place (train with the STE, then
    `finalize_`). First and last layers stay float unless `first` / `last`."""
    added = {}
    for name, module in _layers(model, layers, first, last):
        quant = TernaryWeight(threshold)
        _register(module, name, quant)
        added[name] = quant
    return added


def log2_(
    model: nn.Module,
    bits: int = 5,
    *,
    layers: Layers = None,
    first: bool = True,
    last: bool = True,
    fraction: float = 1.0,
) -> dict[str, Log2Weight]:
    """Power-of-two weights on the chosen layers, in place: the largest `fraction` of each
    layer's weights (by magnitude) to {0, ±2^k} now; `inq_step_` raises the share."""
    check_log2_bits(bits)
    added = {}
    for name, module in _layers(model, layers, first, last):
        quant = Log2Weight(module.weight.detach(), bits)
        _register(module, name, quant)
        added[name] = quant
    inq_step_(model, fraction)
    return added


def inq_step_(model: nn.Module, fraction: float) -> dict[str, int]:
    """Raise every Log2Weight layer's quantized share to exactly `fraction` (largest
    magnitudes of the free weights first); return how many weights each froze."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    done = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        for p in module.parametrizations.weight:
            if isinstance(p, Log2Weight):
                done[name] = p.freeze_(module.parametrizations.weight.original, fraction)
    if not done:
        raise ValueError("the model has no power-of-two layers; call penjing.quant.log2_ first")
    return done


def inq_(
    model: nn.Module,
    train_loader: Iterable,
    bits: int = 5,
    *,
    schedule: Sequence[float] = INQ_SCHEDULE,
    epochs: int = 1,
    lr: float = 1e-4,
    layers: Layers = None,
    **fit_kwargs,
) -> dict[str, Log2Weight]:
    """Incremental network quantization, in place: for each share in `schedule`
    (increasing, ending at 1.0) quantize that share of every layer's weights to
    {0, ±2^k} and retrain the free ones for `epochs` epochs (none after the last step).

    >>> pj.quant.inq_(model, train, bits=5, epochs=1)   # then finalize_ and save
    """
    steps = list(schedule)
    if not steps or any(not a < b for a, b in zip([0.0, *steps], steps, strict=False)) \
            or steps[-1] != 1.0:
        raise ValueError(f"schedule must increase strictly within (0, 1] and end at 1.0, "
                         f"got {schedule!r}")
    added = log2_(model, bits, layers=layers, fraction=steps[0])
    for i, share in enumerate(steps):
        inq_step_(model, share)
        if i < len(steps) - 1:
            fit(model, train_loader, epochs=epochs, lr=lr, **fit_kwargs)
    return added
