"""The dependency graph of a model's channels, found by tracing it with torch.fx.

`dependency_graph(model, example_inputs)` traces the model once and runs the traced graph on
the example inputs while propagating channel labels (see `penjing.prune.labels`). Each layer
records *slots*: one dim of one parameter or buffer (conv weight dim 0 = its filters, dim 1
= its input channels, BatchNorm running_mean dim 0, ...) with the element id of every index
along that dim. Elements that must be removed together end up in one set; a set is the unit
that scoring and surgery act on (see `penjing.prune.groups`).

An op the graph does not know is an error that names the node, never silently treated as
element-wise. Ops whose channel coupling cannot be expressed by removing channels (LayerNorm
over the channel dim, softmax over channels, matmul contractions, MultiheadAttention) *pin*
their channels: those stay, everything else can still be pruned.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from penjing.errors import UnsupportedLayerError
from penjing.prune import labels as lab
from penjing.prune.labels import UnionFind


@dataclass
class Slot:
    """One dim of one tensor of one module, with the element id of each index along it."""

    fqn: str  # module path; "" is the model itself
    name: str  # parameter or buffer name, "" when the module has none (attribute only)
    dim: int
    role: str  # "out": the layer makes these channels; "in": it reads them; "norm"/"dw": both
    labels: np.ndarray
    order: int  # when the slot was first met, for a stable group order


@dataclass
class DependencyGraph:
    """Which indices of which tensors are coupled, for one model and one input shape."""

    model: nn.Module
    slots: dict[tuple[str, str, int], Slot] = field(default_factory=dict)
    sets: UnionFind = field(default_factory=UnionFind)

    def groups(self):
        """The prunable groups of coupled channels (see `penjing.prune.groups.Group`)."""
        from penjing.prune.groups import build_groups

        return build_groups(self)


class _Tracer(torch.fx.Tracer):
    """The default fx tracer (torch.nn layers are leaves) that remembers where tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_at: str | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model as a torch.fx GraphModule sharing its layers; untraceable → a clear error."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types; all mean the same thing to the user
        where = tracer.failed_at
        part = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else (
            f"{type(model).__name__}.forward"
        )
        raise UnsupportedLayerError(
            f"torch.fx cannot trace {part}: {type(err).__name__}: {err}. Structured pruning "
            "needs a forward without Python control flow on tensor values; rewrite that part "
            "or move it outside the model"
        ) from err
    return torch.fx.GraphModule(model, graph)


def dependency_graph(
    model: nn.Module, example_inputs: torch.Tensor | tuple[Any, ...]
) -> DependencyGraph:
    """Trace `model`, run it once on `example_inputs` and record how its channels are coupled.

    The model is run in eval mode under no_grad, so BatchNorm statistics do not move.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    gm = trace(model)
    graph = DependencyGraph(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _Propagator(gm, graph).run(*inputs)
    finally:
        model.train(was_training)
    return graph


@dataclass
class _Call:
    node: torch.fx.Node
    result: Any
    args: tuple
    kwargs: dict
    largs: tuple  # labels of args (None where an arg is no tensor)
    lkwargs: dict

    def arg(self, i: int, name: str, default=None):
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        found = []
        for v, lv in [*zip(self.args, self.largs, strict=True),
                      *((self.kwargs[k], self.lkwargs[k]) for k in self.kwargs)]:
            if isinstance(v, torch.Tensor) and isinstance(lv, torch.Tensor):
                found.append((v, lv))
            elif isinstance(v, list | tuple):
                found += [(a, b) for a, b in zip(v, lv or (), strict=False)
                          if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)]
        return found


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, list | tuple):
        return any(_has_tensor(v) for v in value)
    return False


def _pinned_like(value: Any):
    if isinstance(value, torch.Tensor):
        return lab.pinned(value.dim())
    if isinstance(value, list | tuple):
        return tuple(_pinned_like(v) for v in value)
    return None


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Propagator(torch.fx.Interpreter):
    """Runs the traced graph and, beside each value, its channel labels."""

    def __init__(self, gm: torch.fx.GraphModule, graph: DependencyGraph) -> None:
        super().__init__(gm)
        self.dep = graph
        self.uf = graph.sets
        self.labels: dict[torch.fx.Node, Any] = {}
        self.producers: dict[str, np.ndarray] = {}

    # --- bookkeeping -------------------------------------------------------------------
    def slot(self, fqn: str, name: str, dim: int, role: str, labels: np.ndarray) -> None:
        key = (fqn, name, dim)
        if key in self.dep.slots:  # a module called twice: both calls touch the same indices
            self.uf.union_arrays(self.dep.slots[key].labels, labels)
            return
        self.dep.slots[key] = Slot(fqn, name, dim, role, labels, len(self.dep.slots))

    def produce(self, fqn: str, count: int) -> np.ndarray:
        if fqn not in self.producers:
            self.producers[fqn] = self.uf.new(count)
        return self.producers[fqn]

    def pin_all(self, call: _Call) -> None:
        for _, labels in call.tensors():
            self.uf.pin(labels)

    # --- the walk ------------------------------------------------------------------------
    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        self.labels[n] = self.label(n, result)
        return result

    def label(self, n: torch.fx.Node, result: Any) -> Any:
        if n.op in ("placeholder", "get_attr"):
            return _pinned_like(result)
        if n.op == "output":
            torch.fx.node.map_arg(n.args, lambda a: self._pin_value(self.labels.get(a)))
            return None
        if not _has_tensor(result):
            return None
        call = _Call(
            n, result,
            torch.fx.node.map_arg(n.args, lambda a: self.env[a]),
            torch.fx.node.map_arg(n.kwargs, lambda a: self.env[a]),
            torch.fx.node.map_arg(n.args, lambda a: self.labels.get(a)),
            torch.fx.node.map_arg(n.kwargs, lambda a: self.labels.get(a)),
        )
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            for types, rule in MODULE_RULES:
                if isinstance(module, types):
                    return rule(self, call, module, n.target)
            raise UnsupportedLayerError(
                f"module {n.target!r} ({type(module).__name__}) is a layer the dependency "
                "graph does not know, so it cannot tell how it couples channels; supported: "
                f"{', '.join(sorted({t.__name__ for ts, _ in MODULE_RULES for t in _tuple(ts)}))}"
            )
        table = FUNCTION_RULES if n.op == "call_function" else METHOD_RULES
        rule = table.get(n.target)
        if rule is None:
            name = getattr(n.target, "__name__", str(n.target))
            raise UnsupportedLayerError(
                f"op {name!r} at node {n.name!r} ({n.format_node()}) is not one the dependency "
                "graph knows, so it cannot tell how it couples channels; write that part with "
                "torch.nn layers or common tensor ops (add, cat, view, permute, mean, ...)"
            )
        return rule(self, call)

    def _pin_value(self, labels: Any) -> None:
        if isinstance(labels, torch.Tensor):
            self.uf.pin(labels)
        elif isinstance(labels, tuple | list):
            for item in labels:
                self._pin_value(item)

    # --- generic rules -------------------------------------------------------------------
    def replay(self, call: _Call) -> Any:
        """Data-movement ops: run the very same op on the materialized labels."""
        def swap(v, lv):
            if isinstance(v, torch.Tensor) and isinstance(lv, torch.Tensor):
                return lab.full(lv, v.shape)
            if isinstance(v, list | tuple) and isinstance(lv, list | tuple):
                return type(v)(swap(a, b) for a, b in zip(v, lv, strict=True))
            return v

        args = tuple(swap(v, lv) for v, lv in zip(call.args, call.largs, strict=True))
        kwargs = {k: swap(v, call.lkwargs.get(k)) for k, v in call.kwargs.items()}
        node = call.node
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_module":
            out = self.module.get_submodule(node.target)(*args, **kwargs)
        else:
            out = node.target(*args, **kwargs)
        out = _compress_tree(out)
        tensors = call.tensors()
        if not tensors or not isinstance(call.args[0], torch.Tensor):
            return out
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if isinstance(node.target, str) and node.op == "call_module":
            name = type(self.module.get_submodule(node.target)).__name__.lower()
        return self.keep_consistent(name, tensors[0][1], out)

    def keep_consistent(self, name: str, before: torch.Tensor, out: Any) -> Any:
        """Make a replayed op still place channels right once some are gone.

        Selecting channels by position (x[:, :8], narrow) breaks when the count changes, so
        those channels stay. Splitting into equal pieces (chunk) or reshaping one channel dim
        into several (a channel shuffle's view(n, g, c // g, ...)) stays right only if every
        piece loses the same positions: those positions are coupled.
        """
        roots = set(self.uf.roots(before.numpy()).ravel().tolist())
        if name in _SPLITS and isinstance(out, tuple):
            pieces = [p for p in out if isinstance(p, torch.Tensor)]
            if all(set(self.uf.roots(p.numpy()).ravel().tolist()) == roots for p in pieces):
                return out
            shapes = {tuple(p.shape) for p in pieces}
            if len(shapes) > 1 or any(p.dim() != pieces[0].dim() for p in pieces):
                self.uf.pin(before)
                return _pinned_like(out)
            for p in pieces[1:]:
                self.uf.union_arrays(pieces[0].numpy(), p.numpy())
            return out
        if name in _SELECTS and isinstance(out, torch.Tensor):
            if set(self.uf.roots(out.numpy()).ravel().tolist()) != roots:
                self.uf.pin(before)
                return lab.pinned(out.dim())
            return out
        if name in _RESHAPES and isinstance(out, torch.Tensor):
            dims = lab.varying(out)
            if len(dims) > 1:  # prune the innermost of the split dims, the same in every block
                block = out.permute(*[d for d in range(out.dim()) if d not in dims], *dims)
                block = block.reshape(-1, out.shape[dims[-1]]).numpy()
                self.uf.union_arrays(block[:1], block)
        return out

    def same(self, call: _Call) -> Any:
        """Ops that keep every channel where it was: element-wise, pooling, padding, resizing."""
        value, labels = call.tensors()[0]
        result = call.result
        if not isinstance(result, torch.Tensor) or result.dim() != value.dim():
            self.uf.pin(labels)
            return _pinned_like(result)
        for d in lab.varying(labels):
            if value.shape[d] != result.shape[d]:
                self.uf.pin(labels)
                return lab.pinned(result.dim())
        return labels

    def binary(self, call: _Call) -> torch.Tensor:
        """Element-wise ops on several tensors: channels that meet are coupled."""
        result = call.result
        ndim = result.dim()
        ops = []
        for value, labels in call.tensors():
            pad = ndim - value.dim()
            ops.append(([1] * pad + list(value.shape),
                        labels.reshape([1] * pad + list(labels.shape))))
        keep = []
        for i, (shape, labels) in enumerate(ops):
            spread = [d for d in range(ndim) if shape[d] == 1 and result.shape[d] > 1]
            # A size-1 operand broadcast across varying channels (a per-image scale, a
            # spatial mask) is needed by all of them: it stays, the channels stay free.
            if any(o.shape[d] > 1 for j, (_, o) in enumerate(ops) if j != i for d in spread):
                self.uf.pin(labels)
            else:
                keep.append(labels)
        if not keep:
            return lab.pinned(ndim)
        shape = torch.broadcast_shapes(*(k.shape for k in keep))
        base = keep[0].expand(shape).contiguous()
        for other in keep[1:]:
            self.uf.union_arrays(base.numpy(), other.expand(shape).contiguous().numpy())
        return lab.compress(base)

    def reduce(self, call: _Call) -> Any:
        value, labels = call.tensors()[0]
        dims = call.arg(1, "dim", None)
        keepdim = bool(call.arg(2, "keepdim", False))
        if isinstance(dims, torch.Tensor):  # torch.max(a, b) is element-wise
            return self.binary(call)
        dims = range(value.dim()) if dims is None else (dims if isinstance(dims, list | tuple)
                                                       else (dims,))
        dims = sorted({_dim(d, value.dim()) for d in dims})
        if any(labels.shape[d] > 1 for d in dims):  # summing over channels mixes them
            self.uf.pin(labels)
            return _pinned_like(call.result)
        out = labels
        if not keepdim:
            for d in reversed(dims):
                out = out.squeeze(d)
            if len(dims) == value.dim():
                out = lab.pinned(0)
        if isinstance(call.result, tuple):  # max/min over a dim: (values, indices)
            return (out, out)
        return out

    def along_dim(self, call: _Call, dims: list[int]) -> torch.Tensor:
        """Softmax, layer norm and the like over `dims`: channels there influence each other."""
        value, labels = call.tensors()[0]
        if any(labels.shape[_dim(d, value.dim())] > 1 for d in dims):
            self.uf.pin(labels)
            return lab.pinned(value.dim())
        return labels

    def softmax(self, call: _Call) -> torch.Tensor:
        return self.along_dim(call, [call.arg(1, "dim")])

    def layer_norm_fn(self, call: _Call) -> torch.Tensor:
        shape = call.arg(1, "normalized_shape")
        count = 1 if isinstance(shape, int) else len(shape)
        return self.along_dim(call, list(range(-count, 0)))

    def matmul(self, call: _Call) -> torch.Tensor:
        (a, la), (b, lb) = call.tensors()[:2]
        ndim = call.result.dim()
        if a.dim() < 2 or b.dim() < 2:
            self.pin_all(call)
            return lab.pinned(ndim)
        if la.shape[-1] > 1:  # the contracted dim mixes its channels
            self.uf.pin(la)
        if lb.shape[-2] > 1:
            self.uf.pin(lb)
        la = la.narrow(-1, 0, 1)
        lb = lb.narrow(-2, 0, 1)
        la = la.reshape([1] * (ndim - la.dim()) + list(la.shape))
        lb = lb.reshape([1] * (ndim - lb.dim()) + list(lb.shape))
        shape = torch.broadcast_shapes(la.shape, lb.shape)
        base = la.expand(shape).contiguous()
        self.uf.union_arrays(base.numpy(), lb.expand(shape).contiguous().numpy())
        return lab.compress(base)

    def opaque(self, call: _Call) -> Any:
        """Ops that mix channels in ways surgery cannot follow: every channel they touch stays."""
        self.pin_all(call)
        return _pinned_like(call.result)

    def fresh(self, call: _Call) -> Any:
        return _pinned_like(call.result)

    # --- layers ----------------------------------------------------------------------------
    def channel_vector(self, labels: torch.Tensor, dim: int, size: int) -> np.ndarray:
        """The labels along `dim`; if they vary along other dims too, pin them all."""
        if any(d != dim for d in lab.varying(labels)):
            self.uf.pin(labels)
            return np.zeros(size, dtype=np.int64)
        return lab.vector(labels, dim, size)

    def conv(self, call: _Call, m: nn.Module, fqn: str) -> torch.Tensor:
        value, labels = call.tensors()[0]
        ndim = call.result.dim()
        inputs = self.channel_vector(labels, 1, m.in_channels)
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        bias = m.bias is not None
        if g == 1:
            self.slot(fqn, "weight", 1, "in", inputs)
            out = self.produce(fqn, cout)
            self.slot(fqn, "weight", 0, "out", out)
        elif g == cin == cout:  # depthwise: channel i in, channel i out, one filter each
            self.slot(fqn, "weight", 0, "dw", inputs)
            out = inputs
        elif g == cin:  # depthwise with a channel multiplier: keep it whole
            self.uf.pin(inputs)
            return lab.pinned(ndim)
        else:
            # Grouped conv: every group must keep the same count, so position p is pruned
            # in all groups at once, for inputs and outputs alike.
            per_in, per_out = cin // g, cout // g
            self.uf.union_arrays(inputs.reshape(g, per_in)[:1], inputs.reshape(g, per_in))
            self.slot(fqn, "weight", 1, "in", inputs[:per_in])
            out = self.produce(fqn, cout)
            self.uf.union_arrays(out.reshape(g, per_out)[:1], out.reshape(g, per_out))
            self.slot(fqn, "weight", 0, "out", out)
        if bias:
            self.slot(fqn, "bias", 0, self.dep.slots[(fqn, "weight", 0)].role, out)
        return lab.along(out, 1, ndim)

    def linear(self, call: _Call, m: nn.Linear, fqn: str) -> torch.Tensor:
        value, labels = call.tensors()[0]
        ndim = call.result.dim()
        self.slot(fqn, "weight", 1, "in", self.channel_vector(labels, value.dim() - 1,
                                                               m.in_features))
        out = self.produce(fqn, m.out_features)
        self.slot(fqn, "weight", 0, "out", out)
        if m.bias is not None:
            self.slot(fqn, "bias", 0, "out", out)
        return lab.along(out, ndim - 1, ndim)

    def batch_norm(self, call: _Call, m: nn.Module, fqn: str) -> torch.Tensor:
        value, labels = call.tensors()[0]
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not (
            m.affine or m.track_running_stats
        ):
            return labels  # nothing per channel to slice
        channels = self.channel_vector(labels, 1, m.num_features)
        names = [n for n in ("weight", "bias", "running_mean", "running_var")
                 if getattr(m, n, None) is not None]
        for name in names or [""]:
            self.slot(fqn, name, 0, "norm", channels)
        return lab.along(channels, 1, value.dim())

    def prelu(self, call: _Call, m: nn.PReLU, fqn: str) -> torch.Tensor:
        value, labels = call.tensors()[0]
        if m.num_parameters == 1:
            return labels
        channels = self.channel_vector(labels, 1, m.num_parameters)
        self.slot(fqn, "weight", 0, "norm", channels)
        return lab.along(channels, 1, value.dim())

    def layer_norm(self, call: _Call, m: nn.LayerNorm, fqn: str) -> torch.Tensor:
        return self.along_dim(call, list(range(-len(m.normalized_shape), 0)))

    def group_norm(self, call: _Call, m: nn.GroupNorm, fqn: str) -> torch.Tensor:
        return self.along_dim(call, [1])

    def embedding(self, call: _Call, m: nn.Embedding, fqn: str) -> torch.Tensor:
        self.pin_all(call)
        out = self.produce(fqn, m.embedding_dim)
        self.slot(fqn, "weight", 1, "out", out)
        return lab.along(out, call.result.dim() - 1, call.result.dim())

    def softmax_module(self, call: _Call, m: nn.Module, fqn: str) -> torch.Tensor:
        return self.along_dim(call, [m.dim if m.dim is not None else 1])

    def module_same(self, call: _Call, m: nn.Module, fqn: str) -> Any:
        return self.same(call)

    def module_replay(self, call: _Call, m: nn.Module, fqn: str) -> Any:
        return self.replay(call)

    def module_opaque(self, call: _Call, m: nn.Module, fqn: str) -> Any:
        return self.opaque(call)


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _compress_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return lab.compress(value)
    if isinstance(value, list | tuple):
        return tuple(_compress_tree(v) for v in value)
    return value


P = _Propagator
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
MODULE_RULES: list[tuple[Any, Callable]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), P.conv),
    (nn.Linear, P.linear),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
      nn.InstanceNorm3d), P.batch_norm),
    (nn.PReLU, P.prelu),
    (nn.LayerNorm, P.layer_norm),
    (nn.GroupNorm, P.group_norm),
    (nn.Embedding, P.embedding),
    ((nn.Softmax, nn.LogSoftmax), P.softmax_module),
    (_ELEMENTWISE + _SPATIAL, P.module_same),
    ((nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle),
     P.module_replay),
    ((nn.MultiheadAttention, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
     P.module_opaque),
]

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
_SPLITS = {"chunk", "split", "unbind", "tensor_split"}
_SELECTS = {"getitem", "narrow"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.pow, operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.add,
    torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where, torch.pow,
    torch.lerp, torch.addcmul,
]
_REPLAY_FUNCTIONS = [
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
    torch.squeeze, torch.cat, torch.concat, torch.stack, torch.chunk, torch.split,
    torch.unbind, torch.narrow, torch.flip, torch.movedim, torch.tensor_split,
    operator.getitem, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
    torch.t,
]
_REDUCE_FUNCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min,
                     torch.std, torch.var, torch.logsumexp, torch.prod]
FUNCTION_RULES: dict[Any, Callable] = {
    **{f: P.same for f in _SAME_FUNCTIONS},
    **{f: P.binary for f in _BINARY_FUNCTIONS},
    **{f: P.replay for f in _REPLAY_FUNCTIONS},
    **{f: P.reduce for f in _REDUCE_FUNCTIONS},
    torch.softmax: P.softmax, F.softmax: P.softmax, torch.log_softmax: P.softmax,
    F.log_softmax: P.softmax, F.normalize: lambda self, call: self.along_dim(
        call, [call.arg(2, "dim", 1)]),
    F.layer_norm: P.layer_norm_fn,
    operator.matmul: P.matmul, torch.matmul: P.matmul, torch.bmm: P.matmul,
    F.linear: P.opaque, F.conv1d: P.opaque, F.conv2d: P.opaque, F.conv3d: P.opaque,
    torch.einsum: P.opaque, F.scaled_dot_product_attention: P.opaque,
    torch.zeros_like: P.fresh, torch.ones_like: P.fresh, torch.full_like: P.fresh,
    torch.rand_like: P.fresh, torch.randn_like: P.fresh, torch.zeros: P.fresh,
    torch.ones: P.fresh, torch.arange: P.fresh, torch.full: P.fresh,
    getattr: P.replay,  # x.T, x.mT
}
_SAME_METHODS = ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt",
                 "rsqrt", "abs", "neg", "clamp", "clamp_", "clip", "float", "half", "double",
                 "to", "type_as", "detach", "clone", "square", "contiguous"]
_BINARY_METHODS = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow",
                   "maximum", "minimum", "masked_fill", "masked_fill_", "lerp"]
_REPLAY_METHODS = ["view", "reshape", "flatten", "permute", "transpose", "unsqueeze", "squeeze",
                   "expand", "expand_as", "repeat", "chunk", "split", "unbind", "narrow",
                   "flip", "movedim", "t", "view_as", "reshape_as", "unflatten",
                   "tensor_split"]
_REDUCE_METHODS = ["mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp",
                   "prod"]
METHOD_RULES: dict[str, Callable] = {
    **{m: P.same for m in _SAME_METHODS},
    **{m: P.binary for m in _BINARY_METHODS},
    **{m: P.replay for m in _REPLAY_METHODS},
    **{m: P.reduce for m in _REDUCE_METHODS},
    "softmax": P.softmax, "log_softmax": P.softmax,
    "matmul": P.matmul, "bmm": P.matmul, "size": P.fresh, "dim": P.fresh,
}
