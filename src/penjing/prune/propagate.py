"""Channel-label propagation: run a traced model and, beside every value, its channel labels.

The rules (see `penjing.prune.ops` for which op follows which) record, for every layer, the
*slots* it owns (one dim of one parameter or buffer) with the element id of each index, and
unite the elements that must be removed together. Ops whose channel coupling cannot be
expressed by removing channels *pin* their channels: those stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
from torch import nn

from penjing.errors import UnsupportedLayerError
from penjing.prune import labels as lab
from penjing.prune import ops
from penjing.prune.labels import Slot

if TYPE_CHECKING:
    from penjing.prune.graph import DependencyGraph


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


class Propagator(torch.fx.Interpreter):
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
            for types, rule in ops.MODULE_RULES:
                if isinstance(module, types):
                    return getattr(self, rule)(call, module, n.target)
            known = sorted({t.__name__ for ts, _ in ops.MODULE_RULES for t in _tuple(ts)})
            raise UnsupportedLayerError(
                f"module {n.target!r} ({type(module).__name__}) is a layer the dependency "
                "graph does not know, so it cannot tell how it couples channels; supported: "
                f"{', '.join(known)}"
            )
        table = ops.FUNCTION_RULES if n.op == "call_function" else ops.METHOD_RULES
        rule = table.get(n.target)
        if rule is None:
            name = getattr(n.target, "__name__", str(n.target))
            raise UnsupportedLayerError(
                f"op {name!r} at node {n.name!r} ({n.format_node()}) is not one the dependency "
                "graph knows, so it cannot tell how it couples channels; write that part with "
                "torch.nn layers or common tensor ops (add, cat, view, permute, mean, ...)"
            )
        return getattr(self, rule)(call)

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
        return self.keep_consistent(call, *tensors[0], out)

    def keep_consistent(self, call: _Call, value: torch.Tensor, before: torch.Tensor,
                        out: Any) -> Any:
        """Make a replayed op still place channels right once some are gone.

        The code runs again on the pruned model, so a number written in it (x[:, :8], a
        permutation list, split(4), view(-1, 128)) no longer fits once a dim it addresses
        shrinks: those channels stay. Splitting into equal pieces (chunk) or reshaping one
        channel dim into several (a channel shuffle's view(n, g, c // g, ...)) stays right
        only if every piece loses the same positions: those positions are coupled. A size
        computed from a shape (x.size(1) // 2) is an fx node, not a number, and follows.
        """
        node, module = call.node, None
        if node.op == "call_module":
            module = self.module.get_submodule(node.target)
            name = type(module).__name__.lower()
        else:
            name = node.target if isinstance(node.target, str) else node.target.__name__
        if name in ops.SPLITS and isinstance(out, tuple):
            pieces = [p for p in out if isinstance(p, torch.Tensor)]
            line = self.roots(before).reshape(-1)
            if all(torch.equal(self.roots(p).reshape(-1), line) for p in pieces):
                return out  # split along a dim that pruning never shrinks
            if len({tuple(p.shape) for p in pieces}) > 1 or ops.fixed_split(node):
                self.uf.pin(before)
                return _pinned_like(out)
            for p in pieces[1:]:
                self.uf.union_arrays(pieces[0].numpy(), p.numpy())
            return out
        if name in ops.SELECTS and isinstance(out, torch.Tensor):
            # a part of the channels, or all of them in another order
            if not torch.equal(self.roots(out).reshape(-1), self.roots(before).reshape(-1)):
                self.uf.pin(before)
                return lab.pinned(out.dim())
            return out
        if name in ops.SHUFFLES:  # view (g, c/g), swap, flatten: position p of every group
            groups = module.groups if module is not None else call.arg(1, "groups")
            grid = lab.full(before, value.shape).movedim(1, -1)
            grid = grid.reshape(-1, groups, value.shape[1] // groups).numpy()
            self.uf.union_arrays(grid[:, :1], grid)
            return out
        if name in ops.RESHAPES and isinstance(out, torch.Tensor):
            dims = lab.varying(out)
            if len(dims) > 1:  # prune the innermost of the split dims, the same in every block
                block = out.permute(*[d for d in range(out.dim()) if d not in dims], *dims)
                block = block.reshape(-1, out.shape[dims[-1]]).numpy()
                self.uf.union_arrays(block[:1], block)
            if ops.fixed_dims(node, module, value.dim()) & set(lab.varying(self.roots(out))):
                self.uf.pin(before)
                return lab.pinned(out.dim())
        return out

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label's set, shrunk to size 1 along dims where the sets do not change."""
        return lab.compress(torch.from_numpy(self.uf.roots(labels.numpy())))

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
        if isinstance(dims, torch.Tensor):  # torch.max(a, b) is element-wise
            return self.binary(call)
        dims = range(value.dim()) if dims is None else (dims if isinstance(dims, list | tuple)
                                                       else (dims,))
        dims = sorted({_dim(d, value.dim()) for d in dims})
        if any(labels.shape[d] > 1 for d in dims):  # summing over channels mixes them
            self.uf.pin(labels)
            return _pinned_like(call.result)
        out = labels
        # read keepdim off the result: std and var take `unbiased` where others take keepdim
        result = call.result[0] if isinstance(call.result, tuple) else call.result
        if result.dim() < value.dim():
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

    def normalize(self, call: _Call) -> torch.Tensor:
        return self.along_dim(call, [call.arg(2, "dim", 1)])

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


