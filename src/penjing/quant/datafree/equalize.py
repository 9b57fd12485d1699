"""Cross-layer equalization and high-bias absorption (Nagel et al., ICCV 2019, "Data-Free
Quantization"), on any model torch.fx can trace.

Two layers form a *pair* when the first one's output reaches the second only through a
ReLU-family activation (ReLU, ReLU6, Hardtanh / clamp from 0, LeakyReLU) and ops that
commute with a positive per-channel scale (pooling, zero padding, flatten, dropout,
identity). For f positively homogeneous, W₂·f(W₁x + b₁) = (W₂S)·f(S⁻¹W₁x + S⁻¹b₁) for
any positive diagonal S, so scaling output channel i of the first layer by 1/sᵢ and input
channel i of the second by sᵢ keeps the float function. With rᵢ the largest |w| of channel
i in each layer, sᵢ = √(r1ᵢ·r2ᵢ) / r2ᵢ makes both ranges √(r1ᵢ·r2ᵢ): per-tensor weight
quantization then wastes no levels on a few wide channels (depthwise convs after BN
folding are the classic case). A clip at 6 is not homogeneous; its bound is scaled with
the channel, so a ReLU6 becomes a per-channel clamp (`ChannelClip`).

High-bias absorption: after a BN-folded layer the pre-activation of channel i is about
N(βᵢ, γᵢ²); with cᵢ = max(0, βᵢ − 3|γᵢ|), ReLU(x − c) = ReLU(x) − c for nearly every
input, so c moves from the first layer's bias into the second's (b₂ += W₂·c). This
narrows the activation range the next quantizer must cover. It needs the second layer to
see no zero padding (a padded border would miss the constant), which is tested by running
it on a constant input.

BatchNorm is folded first (`fold_bn_`); its statistics are what absorption and analytic
bias correction (`penjing.quant.dfq`) use, kept per layer as `LayerStats`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from penjing import tracing
from penjing.errors import PenjingWarning
from penjing.quant.linear.fold import fold_bn_
from penjing.quant.linear.graph import activation

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Ops between the two layers of a pair that commute with a positive per-channel scale.
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_PASS_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d,
                   F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                   torch.flatten}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous", "mean"}
# ...and the subset that keeps a per-channel constant (absorption) and the mean (analytic
# bias correction): no max (it raises the mean), no zero padding (the border misses it).
_MEAN_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten)
_MEAN_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.avg_pool1d,
                   F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, torch.flatten}
_RESHAPES = {"flatten", "view", "reshape", torch.flatten, nn.Flatten}

_ABSORB_SIGMAS = 3.0  # c = β − 3σ: about 0.1 % of a channel's inputs fall below it


class ChannelClip(nn.Module):
    """clamp(x, lower, upper) with bounds per channel (dim 1): a ReLU6 whose channels
    equalization has rescaled. Exports to ONNX as Max / Min."""

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor, dims: int) -> None:
        super().__init__()
        shape = (-1,) + (1,) * dims  # broadcast over the spatial dims of an N·C·… input
        self.register_buffer("lower", lower.detach().float().reshape(shape).clone())
        self.register_buffer("upper", upper.detach().float().reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lower, self.upper)


@dataclass
class LayerStats:
    """Per-channel mean and standard deviation of a layer's pre-activation output, from
    the BatchNorm folded into it (β and |γ|), kept up to date as equalization rescales."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class Pair:
    """Two layers equalized together, the activation between them, and what was done."""

    first: str
    second: str
    activation: str  # 'relu', 'relu6', 'hardtanh', 'clamp', 'leaky_relu' or 'none'
    scale: torch.Tensor | None = None  # s per channel: first / s, second · s
    absorbed: torch.Tensor | None = None  # c per channel moved into the second's bias


@dataclass
class Equalization:
    """What `equalize` did: the pairs equalized, the pairs it skipped and why, the BN
    statistics per layer (for analytic bias correction), and the BatchNorms folded."""

    pairs: list[Pair] = field(default_factory=list)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    stats: dict[str, LayerStats] = field(default_factory=dict)
    folded: list[tuple[str, str]] = field(default_factory=list)
    iterations: int = 0


def _label(gm: fx.GraphModule, node: fx.Node) -> tuple[str, float] | None:
    """('relu' | 'relu6' | ..., upper bound) when `node` is a ReLU-family activation with
    its input as first argument; None otherwise."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, ChannelClip):
            return "clip", math.inf  # bounds are per channel, read from the module
        if isinstance(m, nn.ReLU):
            return "relu", math.inf
        if isinstance(m, nn.ReLU6):
            return "relu6", 6.0
        if isinstance(m, nn.Hardtanh) and m.min_val == 0:
            return "hardtanh", float(m.max_val)
        if isinstance(m, nn.LeakyReLU):
            return "leaky_relu", math.inf
        return None
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, F.relu_, torch.relu_):
            return "relu", math.inf
        if node.target is F.relu6:
            return "relu6", 6.0
        if node.target in (F.hardtanh, F.hardtanh_):
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return ("hardtanh", float(hi)) if lo == 0 else None
        if node.target is F.leaky_relu:
            return "leaky_relu", math.inf
        if node.target in (torch.clamp, torch.clip):
            lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
            hi = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
            if lo == 0 and (hi is None or isinstance(hi, int | float)):
                return "clamp", math.inf if hi is None else float(hi)
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", math.inf
    return None


def _what(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    return getattr(node.target, "__name__", str(node.target))


def _passes(gm: fx.GraphModule, node: fx.Node, mean: bool = False) -> bool:
    modules, functions = (_MEAN_MODULES, _MEAN_FUNCTIONS) if mean else (_PASS_MODULES,
                                                                         _PASS_FUNCTIONS)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, modules) and type(m) is not nn.Module
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        if node.target == "mean":  # a mean over the spatial dims (global pooling) only
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = dims if isinstance(dims, tuple | list) else (dims,)
            return all(isinstance(d, int) and (d >= 2 or d < -1) for d in dims) and bool(dims)
        return node.target in _PASS_METHODS
    return False


def _is_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    return node.target in _RESHAPES


@dataclass
class _Candidate:
    first: fx.Node
    second: fx.Node | None
    act: fx.Node | None
    label: str
    upper: float
    reshaped: bool
    pads_between: bool
    why: str = ""


def _walk(gm: fx.GraphModule, node: fx.Node) -> _Candidate | None:
    """Follow the output of layer `node` to the next layer; None when it reaches no layer
    through single-reader ops (it ends in an add, a concat, the output: not a pair)."""
    act, label, upper, reshaped, pads, why = None, "none", math.inf, False, False, ""
    value = node
    while True:
        users = list(value.users)
        if len(users) != 1:
            readers = [u for u in users if _reaches_layer(gm, u)]
            if len(users) > 1 and readers:
                why = f"a branch: its output is read by {len(users)} ops"
                return _Candidate(node, readers[0], act, label, upper, reshaped, pads, why)
            return None
        (user,) = users
        if user.args and user.args[0] is not value:
            return None  # read as a second argument (an add, a matmul): not a chain
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), LAYERS):
            return _Candidate(node, user, act, label, upper, reshaped, pads)
        found = _label(gm, user)
        if found is not None and act is None:
            act, (label, upper) = user, found
        elif found is not None:
            why = f"two activations ({_what(gm, act)}, {_what(gm, user)})"
        elif _passes(gm, user):
            reshaped |= _is_reshape(gm, user)
            pads |= user.op == "call_module" and isinstance(
                gm.get_submodule(user.target), nn.ZeroPad1d | nn.ZeroPad2d | nn.ZeroPad3d)
        else:

            if activation(gm, user) is None or not _reaches_layer(gm, user):
                return None
            why = f"{_what(gm, user)} is not ReLU-family (not positively homogeneous)"
        if why:
            second = _next_layer(gm, user)
            return None if second is None else _Candidate(
                node, second, act, label, upper, reshaped, pads, why)
        value = user


def _next_layer(gm: fx.GraphModule, node: fx.Node, depth: int = 8) -> fx.Node | None:
    """The layer reached from `node` through single-reader ops within `depth` steps."""
    for _ in range(depth):
        if len(node.users) != 1:
            return None
        (node,) = node.users
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), LAYERS):
            return node
    return None


def _reaches_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), LAYERS):
        return True
    return _next_layer(gm, node) is not None


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    """Largest |w| per input channel of a conv (any groups) or linear."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.abs().amax(0)
    groups = layer.groups
    per = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)
    return per.abs().amax(dim=(1, 3)).reshape(-1)


def _scale_inputs_(layer: nn.Module, s: torch.Tensor) -> None:
    """Multiply input channel i of `layer` by s[i] (s has one entry per input channel)."""
    w = layer.weight.data
    if isinstance(layer, nn.Linear):
        w.mul_(s.reshape(1, -1))
        return
    groups = layer.groups
    view = w.view(groups, w.shape[0] // groups, w.shape[1], -1)
    view.mul_(s.reshape(groups, 1, w.shape[1], 1))


def input_response(weight: torch.Tensor, groups: int, c: torch.Tensor) -> torch.Tensor:
    """Σᵢ Σ_taps w[o, i]·c[i] per output o: what a constant c per input channel adds to
    each output of a linear (2-D weight) or a conv with `groups` groups."""
    if weight.dim() == 2:
        return weight @ c
    out, ipg = weight.shape[0], weight.shape[1]
    per = weight.reshape(groups, out // groups, ipg, -1).sum(-1)  # (groups, opg, ipg)
    return (per * c.reshape(groups, 1, ipg)).sum(-1).reshape(out)


def sees_padding(layer: nn.Module) -> bool:
    """Whether `layer` (a conv, or a subclass padding in its own forward) reads zeros
    beyond the border: its response to a constant input then varies across positions.
    Probed at two sizes of each parity, since a fixed one-sided pad (TensorFlow's "same"
    at stride 2) is read only by some input sizes."""
    if isinstance(layer, nn.Linear):
        return False
    w = layer.weight
    base = [max(8, 3 * k * d + 2 * s) for k, d, s in
            zip(w.shape[2:], layer.dilation, layer.stride, strict=True)]
    for extra in (0, 1):
        x = torch.ones(1, w.shape[1] * layer.groups, *[b + extra for b in base])
        with torch.no_grad():
            y = layer(x).flatten(2)
        spread = (y.amax(-1) - y.amin(-1)).abs().max()
        if bool(spread > 1e-5 * (y.abs().max() + 1e-12)):
            return True
    return False


def _repeat(v: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Per-channel values `v` laid out along `layer`'s inputs: a Linear after a flatten
    of C×H×W reads channel c at positions c·HW … (c+1)·HW − 1."""
    n = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if n == v.numel():
        return v
    return v.repeat_interleave(n // v.numel())


def _bn_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (m.bias.detach().clone() if m.bias is not None
                   else torch.zeros_like(m.running_mean),
                   m.weight.detach().abs().clone() if m.weight is not None
                   else torch.ones_like(m.running_var))
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _candidates(gm: fx.GraphModule) -> list[_Candidate]:
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), LAYERS):
            continue
        cand = _walk(gm, node)
        if cand is None:
            continue
        first, second = gm.get_submodule(node.target), gm.get_submodule(cand.second.target)
        if not cand.why:
            if calls[node.target] != 1 or calls[cand.second.target] != 1:
                cand.why = "a layer that forward calls more than once"
            n_in = (second.in_features if isinstance(second, nn.Linear)
                    else second.in_channels)
            n_out = first.out_features if isinstance(first, nn.Linear) else first.out_channels
            if not cand.why and n_in != n_out and not (cand.reshaped and n_in % n_out == 0):
                cand.why = f"{n_out} output channels feed {n_in} inputs"
            elif not cand.why and cand.reshaped and not isinstance(second, nn.Linear):
                cand.why = "a reshape between them moves channels"
        found.append(cand)
    return found


def equalize(
    model: nn.Module,
    *,
    pairs: list[tuple[str, str]] | None = None,
    absorb: bool = True,
    iterations: int = 100,
    tol: float = 1e-4,
) -> tuple[fx.GraphModule, Equalization]:
    """An equalized copy of `model` (a GraphModule: ReLU6 calls become per-channel
    clamps) with BatchNorm folded, and what was done.

    Every conv/linear pair joined by a ReLU-family activation is equalized, sweeping over
    the pairs until no scale moves by more than `tol` (chains need several sweeps) or
    `iterations` sweeps; pairs that do not qualify are named in one PenjingWarning with
    the reason. `pairs` names the (first, second) layers to equalize instead: one that
    does not qualify is a ValueError. `absorb` moves high biases (β − 3σ of the folded
    BatchNorm) into the next layer where that is exact for nearly every input.

    >>> eq, info = pj.quant.equalize(model)   # float function kept; per-tensor friendly
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    model = copy.deepcopy(model).eval()
    bn = _bn_stats(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PenjingWarning)
        folded = fold_bn_(model)
    for w in caught:  # re-raised from here, so the user's filter and location apply
        warnings.warn(str(w.message), PenjingWarning, stacklevel=2)
    stats = {layer: LayerStats(*bn[norm]) for layer, norm in folded}
    gm = tracing.trace(model, LAYERS + (ChannelClip,), advice=(
        "Equalization finds its layer pairs in a traced graph: make data-dependent control "
        "flow a leaf module, or quantize per channel instead"))
    report = Equalization(stats=stats, folded=folded)
    found = _candidates(gm)
    by_name = {(c.first.target, c.second.target): c for c in found}
    if pairs is not None:
        chosen = []
        for first, second in pairs:
            cand = by_name.get((first, second))
            if cand is None:
                raise ValueError(
                    f"layers {first!r} → {second!r} are not a pair: the output of {first!r} "
                    "does not reach it through one activation and pooling/reshape ops; "
                    f"pairs found: {sorted(k for k, c in by_name.items() if not c.why)}")
            if cand.why:
                raise ValueError(f"cannot equalize {first!r} → {second!r}: {cand.why}")
            chosen.append(cand)
    else:
        chosen = [c for c in found if not c.why]
        report.skipped = {(c.first.target, c.second.target): c.why for c in found if c.why}
    n_layers = sum(isinstance(m, LAYERS) for m in gm.modules())
    if report.skipped:
        text = "; ".join(f"{a!r} → {b!r}: {why}" for (a, b), why in report.skipped.items())
        warnings.warn(f"equalize skipped {len(report.skipped)} layer pair(s): {text}",
                      PenjingWarning, stacklevel=2)
    if not chosen and n_layers > 1 and pairs is None:
        warnings.warn(
            f"equalize found no layer pair to equalize among {n_layers} layers of "
            f"{type(model).__name__}: no conv/linear output reaches another through a single "
            "ReLU-family activation; the model is returned unchanged (BatchNorm folded)",
            PenjingWarning, stacklevel=2)
    _clips(gm, chosen)
    report.pairs = [Pair(c.first.target, c.second.target, c.label) for c in chosen]
    with torch.no_grad():
        report.iterations = _sweep(gm, chosen, report, iterations, tol)
        if absorb:
            _absorb(gm, chosen, report)
    gm.recompile()
    return gm, report


def _clips(gm: fx.GraphModule, chosen: list[_Candidate]) -> None:
    """Replace each bounded activation of a chosen pair by its own ChannelClip (a shared
    ReLU6 module may serve several calls; only this call changes)."""
    for cand in chosen:
        if cand.act is None or cand.upper == math.inf or cand.label == "clip":
            continue
        first = gm.get_submodule(cand.first.target)
        n = first.out_features if isinstance(first, nn.Linear) else first.out_channels
        dims = first.weight.dim() - 2
        name = f"{cand.first.target.replace('.', '_')}_clip"
        gm.add_submodule(name, ChannelClip(torch.zeros(n), torch.full((n,), cand.upper), dims))
        with gm.graph.inserting_after(cand.act):
            new = gm.graph.call_module(name, (cand.act.args[0],))
        cand.act.replace_all_uses_with(new)
        gm.graph.erase_node(cand.act)
        cand.act = new
    gm.graph.lint()
    gm.recompile()


def _sweep(gm, chosen, report, iterations, tol) -> int:
    totals = [torch.ones(1)] * len(chosen)
    done = 0
    while done < iterations:
        done += 1
        moved = 0.0
        for k, cand in enumerate(chosen):
            first = gm.get_submodule(cand.first.target)
            second = gm.get_submodule(cand.second.target)
            r1 = first.weight.detach().abs().flatten(1).amax(1)
            r2 = _input_ranges(second)
            if r2.numel() != r1.numel():  # a Linear after flatten: one range per channel
                r2 = r2.reshape(r1.numel(), -1).amax(1)
            s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(1e-30)).sqrt(),
                            torch.ones_like(r1))
            _scale_channels_(gm, cand, first, second, s)
            if cand.first.target in report.stats:
                _scale_stats_(report.stats[cand.first.target], s)
            totals[k] = totals[k] * s
            moved = max(moved, float((s - 1).abs().max()))
        if moved < tol:
            break
    for pair, total in zip(report.pairs, totals, strict=True):
        pair.scale = total
    return done


def _scale_stats_(stats: LayerStats, s: torch.Tensor) -> None:
    stats.mean = stats.mean / s
    stats.std = stats.std / s


def _scale_channels_(gm, cand, first, second, s: torch.Tensor) -> None:
    shape = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.data.div_(s.reshape(shape))
    if first.bias is not None:
        first.bias.data.div_(s)
    _scale_inputs_(second, _repeat(s, second))
    if cand.act is not None and cand.act.op == "call_module":
        clip = gm.get_submodule(cand.act.target)
        if isinstance(clip, ChannelClip):
            clip.upper.div_(s.reshape(clip.upper.shape))
            clip.lower.div_(s.reshape(clip.lower.shape))


def _absorb(gm, chosen, report) -> None:
    for cand, pair in zip(chosen, report.pairs, strict=True):
        stats = report.stats.get(cand.first.target)
        first = gm.get_submodule(cand.first.target)
        second = gm.get_submodule(cand.second.target)
        if (stats is None or cand.label in ("leaky_relu", "none") or cand.pads_between
                or first.bias is None or sees_padding(second) or _maxpool_between(gm, cand)):
            continue
        c = (stats.mean - _ABSORB_SIGMAS * stats.std).clamp_min(0)
        clip = None
        if cand.act is not None and cand.act.op == "call_module":
            clip = gm.get_submodule(cand.act.target)
            if isinstance(clip, ChannelClip):
                c = torch.minimum(c, clip.upper.reshape(-1))
            else:
                clip = None
        if not bool((c > 0).any()):
            continue
        first.bias.data.sub_(c)
        extra = input_response(second.weight.detach(), getattr(second, "groups", 1),
                               _repeat(c, second))
        if second.bias is None:
            second.bias = nn.Parameter(extra.clone())
        else:
            second.bias.data.add_(extra)
        if clip is not None:
            clip.upper.sub_(c.reshape(clip.upper.shape))
        stats.mean = stats.mean - c
        pair.absorbed = c


def _maxpool_between(gm, cand) -> bool:
    node = cand.first
    while node is not cand.second:
        (node,) = node.users
        if node is not cand.second and node is not cand.act and not _passes(gm, node, True):
            return True
    return False
