"""Fold BatchNorm into the conv or linear layer before it, exactly.

With per-channel factor a = γ / √(σ² + ε): W' = W · a (per output channel) and
b' = (b − μ) · a + β. The BatchNorm becomes an Identity, so an eval-mode model computes
the same function with one layer less (and PTQ sees the weights inference will use).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.core.parametrize import Mask
from penjing.errors import PenjingWarning
from penjing.tracing import Tracer

_FOLDABLE = {
    nn.BatchNorm1d: (nn.Linear, nn.Conv1d),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}


def _pairs_by_graph(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(layer, batchnorm) names where the layer's output feeds only that BatchNorm and
    forward calls each of the two once (folding changes every call of both modules), and
    for every other BatchNorm the reason it cannot be folded."""
    graph = Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs, why = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), nn.modules.batchnorm._BatchNorm
        ):
            continue
        source = node.args[0] if node.args else None
        if calls[node.target] != 1:
            why[node.target] = "forward calls it more than once"
        elif not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
            what = source.format_node() if isinstance(source, torch.fx.Node) else repr(source)
            why[node.target] = f"its input is not a layer's output ({what})"
        elif calls[source.target] != 1:
            why[node.target] = f"{source.target!r} before it is called more than once"
        elif len(source.users) != 1:
            why[node.target] = f"the output of {source.target!r} is also read elsewhere"
        else:
            pairs.append((source.target, node.target))
    return pairs, why


def _pairs_by_order(model: nn.Module) -> list[tuple[str, str]]:
    """Adjacent (layer, batchnorm) children of every nn.Sequential: for untraceable models."""
    pairs = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                dot = f"{prefix}." if prefix else ""
                pairs.append((f"{dot}{a}", f"{dot}{b}"))
    return pairs


def _fold_one(layer: nn.Module, bn: nn.Module, names: tuple[str, str]) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold BatchNorm {names[1]!r} into {names[0]!r}: it keeps no running "
            "statistics (track_running_stats=False); train with running statistics to fold it"
        )
    with torch.no_grad():
        a = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            a = a * bn.weight
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        if parametrize.is_parametrized(layer, "weight"):
            chain = layer.parametrizations.weight
            if not all(isinstance(p, Mask) for p in chain):
                raise ValueError(
                    f"{names[0]!r}.weight carries a parametrization other than a pruning "
                    "mask (fake quantization? shared weights?); fold BatchNorm first"
                )
            chain.original.mul_(a.reshape(shape))  # a mask stays valid: zeros stay zero
        else:
            layer.weight.mul_(a.reshape(shape))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * a
        if bn.bias is not None:
            new_bias = new_bias + bn.bias
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)


def _batchnorm_forward(bn: nn.Module) -> bool:
    """Whether `bn` computes a plain BatchNorm (a subclass may add an activation)."""
    return type(bn).forward is nn.modules.batchnorm._BatchNorm.forward


def fold_bn_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Linear/Conv into it, in place.

    Returns the (layer, batchnorm) name pairs folded; each BatchNorm is replaced by an
    nn.Identity. Uses the model's running statistics, so the result matches the model in
    eval mode (to float rounding). Found by tracing with torch.fx (subclasses of Conv,
    Linear and BatchNorm count as those layers); a layer or BatchNorm that forward calls
    more than once is left alone, and so is a BatchNorm subclass with its own forward
    (it may hold an activation). A model that does not trace is searched by the order of
    nn.Sequential children instead. BatchNorms left unfolded are named in a warning with
    the reason.
    """
    modules = dict(model.named_modules())
    try:
        candidates, why = _pairs_by_graph(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure: fall back to module order
        candidates = _pairs_by_order(model)
        why = {"": f"the model does not trace ({type(err).__name__}), so only adjacent "
                   "children of nn.Sequential were paired"}
    folded = []
    for layer_name, bn_name in candidates:
        layer, bn = modules.get(layer_name), modules.get(bn_name)
        kinds = next((k for t, k in _FOLDABLE.items() if isinstance(bn, t)), None)
        if kinds is None or not isinstance(layer, kinds):
            if kinds is not None:
                why[bn_name] = f"{layer_name!r} before it is a {type(layer).__name__}"
            continue
        if layer.weight.shape[0] != bn.num_features:
            why[bn_name] = f"{layer_name!r} is not per channel along the BatchNorm's axis"
            continue
        if not _batchnorm_forward(bn):
            why[bn_name] = f"{type(bn).__name__} has a forward of its own"
            continue
        _fold_one(layer, bn, (layer_name, bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, nn.Identity())
        folded.append((layer_name, bn_name))
    left = [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        reasons = "; ".join(f"{n!r}: {why.get(n, why.get('', 'it follows no Conv/Linear'))}"
                            for n in left[:8])
        more = f" (and {len(left) - 8} more)" if len(left) > 8 else ""
        warnings.warn(
            f"fold_bn_ folded {len(folded)} of {len(folded) + len(left)} BatchNorms; left in "
            f"float: {reasons}{more}", PenjingWarning, stacklevel=2,
        )
    return folded
