"""Which rule of the dependency graph each layer, function and tensor method follows.

Rules are named by the `Propagator` method that applies them: "same" (the op keeps every
channel where it was), "binary" (element-wise on several tensors: channels that meet are
coupled), "replay" (data movement, replayed on the labels), "reduce", "opaque" (mixes
channels in ways surgery cannot follow: they stay), and one rule per kind of layer. An op
missing from these tables is an error that names it, never guessed to be element-wise.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from penjing.prune.heads import HeadAttention
from penjing.prune.masking.compact import ShapeConv2d, StripeConv2d

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_SPATIAL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d,
)
MODULE_RULES: list[tuple[Any, str]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    (nn.Linear, "linear"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
      nn.InstanceNorm3d), "batch_norm"),
    (nn.PReLU, "prelu"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.Embedding, "embedding"),
    ((nn.Softmax, nn.LogSoftmax), "softmax_module"),
    (_ELEMENTWISE + _SPATIAL, "module_same"),
    ((nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle),
     "module_replay"),
    (nn.MultiheadAttention, "attention"),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "module_opaque"),
    # compacted convs come last in a pipeline; attention loses heads with heads_, not here
    ((StripeConv2d, ShapeConv2d, HeadAttention), "module_opaque"),
]
# Layers outside torch.nn that the tracer must not trace into (their rule is above).
LEAVES: list[type[nn.Module]] = [StripeConv2d, ShapeConv2d, HeadAttention]

_SAME_FUNCTIONS = [
    torch.relu, torch.relu_, F.relu, F.relu6, F.gelu, F.silu, F.mish, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu,
    F.selu, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.exp,
    torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, operator.neg, torch.clamp,
    torch.clip, torch.erf, torch.sin, torch.cos, torch.square, torch.nan_to_num,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad, torch.detach,
    torch.clone,
]
SPLITS = {"chunk", "split", "unbind", "tensor_split"}
SELECTS = {"getitem", "narrow"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
SHUFFLES = {"channel_shuffle", "channelshuffle"}
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.pow, operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.add,
    torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where, torch.pow,
    torch.lerp, torch.addcmul,
]
_REPLAY_FUNCTIONS = [
    torch.swapaxes, torch.swapdims,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
    torch.squeeze, torch.cat, torch.concat, torch.stack, torch.chunk, torch.split,
    torch.unbind, torch.narrow, torch.flip, torch.movedim, torch.tensor_split,
    operator.getitem, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
    torch.t,
]
_REDUCE_FUNCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min,
                     torch.std, torch.var, torch.logsumexp, torch.prod, torch.norm,
                     torch.linalg.vector_norm]
FUNCTION_RULES: dict[Any, str] = {
    **{f: "same" for f in _SAME_FUNCTIONS},
    **{f: "binary" for f in _BINARY_FUNCTIONS},
    **{f: "replay" for f in _REPLAY_FUNCTIONS},
    **{f: "reduce" for f in _REDUCE_FUNCTIONS},
    torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "softmax",
    F.log_softmax: "softmax", F.normalize: "normalize",
    F.layer_norm: "layer_norm_fn",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    F.linear: "opaque", F.conv1d: "opaque", F.conv2d: "opaque", F.conv3d: "opaque",
    torch.einsum: "opaque", F.scaled_dot_product_attention: "opaque",
    torch.zeros_like: "fresh", torch.ones_like: "fresh", torch.full_like: "fresh",
    torch.rand_like: "fresh", torch.randn_like: "fresh", torch.zeros: "fresh",
    torch.ones: "fresh", torch.arange: "fresh", torch.full: "fresh", torch.linspace: "fresh",
    torch.logspace: "fresh", torch.empty: "fresh", torch.empty_like: "fresh",
    torch.eye: "fresh", torch.rand: "fresh", torch.randn: "fresh", torch.tensor: "fresh",
    getattr: "replay",  # x.T, x.mT
}
_SAME_METHODS = ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt",
                 "rsqrt", "abs", "neg", "clamp", "clamp_", "clip", "float", "half", "double",
                 "to", "type_as", "detach", "clone", "square", "contiguous"]
_BINARY_METHODS = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow",
                   "maximum", "minimum", "masked_fill", "masked_fill_", "lerp"]
_REPLAY_METHODS = ["view", "reshape", "flatten", "permute", "transpose", "unsqueeze", "squeeze",
                   "expand", "expand_as", "repeat", "chunk", "split", "unbind", "narrow",
                   "flip", "movedim", "t", "view_as", "reshape_as", "unflatten",
                   "tensor_split", "swapaxes", "swapdims", "roll"]
_REDUCE_METHODS = ["mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp",
                   "prod", "norm"]
METHOD_RULES: dict[str, str] = {
    **{m: "same" for m in _SAME_METHODS},
    **{m: "binary" for m in _BINARY_METHODS},
    **{m: "replay" for m in _REPLAY_METHODS},
    **{m: "reduce" for m in _REDUCE_METHODS},
    "softmax": "softmax", "log_softmax": "softmax",
    "matmul": "matmul", "bmm": "matmul", "size": "fresh", "dim": "fresh",
}


# Functions of other packages, by qualified name, so the rule needs no import of them.
# torchvision wraps these for torch.fx (they appear as one call in the trace).
NAMED_RULES: dict[str, str] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": "same",
    "torchvision.models.swin_transformer._patch_merging_pad": "replay",  # pad, 4 slices, cat
    "torchvision.models.swin_transformer._get_relative_position_bias": "opaque",
    "torchvision.models.swin_transformer.shifted_window_attention": "window_attention",
}
JOINS = {"cat", "concat", "concatenate", "stack"}
# Data movement that is right on labels shrunk to size 1 where they do not vary, so the
# labels need not be materialized to the activation's shape first.
LAYOUT = {"permute", "transpose", "movedim", "swapaxes", "swapdims", "t", "unsqueeze",
          "contiguous", "flip", "permute_"}
# What a user may teach the graph, and what each kind means.
KINDS = {
    "same": "keeps every channel where it was (element-wise, activation, pooling, padding)",
    "binary": "element-wise over several tensors: channels that meet are coupled",
    "replay": "moves data (view, permute, cat, getitem): replayed on the channel labels",
    "reduce": "reduces over its `dim` argument; channels reduced over are kept",
    "opaque": "mixes channels in a way surgery cannot follow: every channel it touches stays",
    "fresh": "makes a new tensor whose entries belong to no channel (zeros, arange, a table)",
}


def qualified_name(op: Any) -> str:
    return f"{getattr(op, '__module__', '')}.{getattr(op, '__qualname__', op)}"


def register_op(op: Any, kind: str) -> None:
    """Teach the dependency graph an op: `register_op(my_fn, "same")`.

    `op` is a function (or its qualified name "package.module.function"), a tensor method
    name ("swapaxes"), or an nn.Module class, which then stays whole in the trace. `kind`
    is one of KINDS ("same", "binary", "replay", "reduce", "opaque", "fresh"); modules take
    "same", "replay" or "opaque".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown op rule {kind!r}; choose one of {sorted(KINDS)}: "
                         + "; ".join(f"{k}: {v}" for k, v in KINDS.items()))
    if isinstance(op, type) and issubclass(op, nn.Module):
        if kind not in ("same", "replay", "opaque"):
            raise ValueError(f"a module class takes 'same', 'replay' or 'opaque', got {kind!r}")
        MODULE_RULES.insert(0, (op, f"module_{kind}"))
        LEAVES.append(op)
    elif isinstance(op, str) and "." in op:
        NAMED_RULES[op] = kind
    elif isinstance(op, str):
        METHOD_RULES[op] = kind
    elif callable(op):
        FUNCTION_RULES[op] = kind
    else:
        raise TypeError(f"op must be a function, a qualified name, a tensor method name or an "
                        f"nn.Module class, got {type(op).__name__}")


def function_rule(target: Any) -> str | None:
    """The rule of a called function: by identity, else by qualified name."""
    try:
        rule = FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable callable
        rule = None
    return rule if rule is not None else NAMED_RULES.get(qualified_name(target))


def _arg(node: torch.fx.Node, i: int, *names: str) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return next((node.kwargs[n] for n in names if n in node.kwargs), None)


def _written(size: Any) -> bool:
    """Whether a size is a number in the code; one computed from a shape is an fx Node."""
    return isinstance(size, int) and not isinstance(size, bool) and size != -1


def fixed_split(node: torch.fx.Node) -> bool:
    """Whether a split's sizes (or tensor_split's indices) are numbers in the code."""
    if node.target in ("split", torch.split):
        sizes = _arg(node, 1, "split_size_or_sections", "split_size")
    elif node.target in ("tensor_split", torch.tensor_split):
        sizes = _arg(node, 1, "indices_or_sections", "indices")
        if isinstance(sizes, int):  # a count of equal sections follows the size
            return False
    else:
        return False
    return any(_written(s) for s in (sizes if isinstance(sizes, list | tuple) else [sizes]))


def written_sizes(node: torch.fx.Node, module: nn.Module | None, ndim: int) -> dict[int, int]:
    """{output dim: size} for the sizes of a view, reshape or unflatten of an `ndim`-D input
    that are numbers in the code (not -1, not computed from a shape)."""
    start = 0
    if isinstance(module, nn.Unflatten):
        start, sizes = module.dim, module.unflattened_size
    elif node.target == "unflatten":
        start, sizes = _arg(node, 1, "dim"), _arg(node, 2, "sizes")
    elif node.target in ("view", "reshape"):
        sizes = node.args[1:]
    elif node.target is torch.reshape:
        sizes = (_arg(node, 1, "shape"),)
    else:
        return {}
    if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
        sizes = sizes[0]
    if not isinstance(start, int) or not isinstance(sizes, list | tuple):
        return {}
    start = start + ndim if start < 0 else start
    return {start + i: s for i, s in enumerate(sizes) if _written(s)}


def shape_reads(value: Any) -> list[tuple[torch.fx.Node, int | None]]:
    """The (tensor node, dim) shape reads a size computed in the code comes from
    (`x.size(2) // heads`, `b, t, d = x.shape`); dim None when a whole shape is read."""
    if not isinstance(value, torch.fx.Node):
        if isinstance(value, list | tuple):
            return [r for v in value for r in shape_reads(v)]
        return []
    if value.op == "call_method" and value.target == "size":
        dim = _arg(value, 1, "dim")
        return [(value.args[0], dim if isinstance(dim, int) else None)]
    if value.op == "call_function" and value.target is getattr and value.args[1] == "shape":
        return [(value.args[0], None)]
    if value.op == "call_function" and value.target is operator.getitem:
        inner = shape_reads(value.args[0])
        index = value.args[1]
        if isinstance(index, int) and len(inner) == 1 and inner[0][1] is None:
            return [(inner[0][0], index)]
        return inner
    if value.op in ("call_function", "call_method"):
        return [r for a in (*value.args, *value.kwargs.values()) for r in shape_reads(a)]
    return []
