"""Fold BatchNorm into the conv or linear layer before it, exactly.

With per-channel factor a = γ / √(σ² + ε): W' = W · a (per output channel) and
b' = (b − μ) · a + β. The BatchNorm becomes an Identity, so an eval-mode model computes
the same function with one layer less (and PTQ sees the weights inference will use).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.prune.masks import Mask
from penjing.tracing import Tracer

_FOLDABLE = {
    nn.BatchNorm1d: (nn.Linear, nn.Conv1d),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}


def _pairs_by_graph(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, batchnorm) names where the layer's output feeds only that BatchNorm and
    forward calls each of the two once: folding changes every call of both modules."""
    graph = Tracer().trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1 or calls[node.target] != 1:
            continue
        (user,) = node.users
        if (user.op == "call_module" and user.args and user.args[0] is node
                and calls[user.target] == 1):
            pairs.append((node.target, user.target))
    return pairs


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


def fold_bn_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Linear/Conv into it, in place.

    Returns the (layer, batchnorm) name pairs folded; each BatchNorm is replaced by an
    nn.Identity. Uses the model's running statistics, so the result matches the model in
    eval mode (to float rounding). Found by tracing with torch.fx; a layer or BatchNorm
    that forward calls more than once is left alone. A model that does not trace is
    searched by the order of nn.Sequential children instead.
    """
    modules = dict(model.named_modules())
    try:
        candidates = _pairs_by_graph(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: fall back to module order
        candidates = _pairs_by_order(model)
    folded = []
    for layer_name, bn_name in candidates:
        layer, bn = modules.get(layer_name), modules.get(bn_name)
        kinds = _FOLDABLE.get(type(bn))
        if kinds is None or not isinstance(layer, kinds):
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue  # e.g. a Linear over the wrong axis; not a per-channel affine pair
        _fold_one(layer, bn, (layer_name, bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, nn.Identity())
        folded.append((layer_name, bn_name))
    return folded
