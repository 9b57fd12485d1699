"""Channel-label propagation: run a traced model and, beside every value, its channel labels.

The rules (see `penjing.prune.structural.ops` for which op follows which) record, for every
layer, the *slots* it owns (one dim of one parameter or buffer) with the element id of each
index, and unite the elements that must be removed together. Ops whose channel coupling cannot be
expressed by removing channels *pin* their channels: those stay.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
from torch import nn

from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.prune.structural import labels as lab
from penjing.prune.structural import ops
from penjing.prune.structural.labels import Slot

if TYPE_CHECKING:
    from penjing.prune.structural.graph import DependencyGraph


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


def _module_of(n: torch.fx.Node) -> str:
    """The module whose forward an op sits in, quoted, or '' at the top level."""
    stack = n.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path:
            return f"module {path!r}"
    return ""


def _op_name(root: nn.Module, n: torch.fx.Node) -> str:
    """A node's op as the rule tables name it: "cat", "view", a module type in lowercase."""
    if n.op == "call_module":
        return type(root.get_submodule(n.target)).__name__.lower()
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def _where(n: torch.fx.Node) -> str:
    if n.op == "output":
        return "the model's output"
    if n.op == "placeholder":
        return f"the model input {n.name!r}"
    if n.op == "call_module":
        return f"module {n.target!r}"
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.target)
    inside = _module_of(n)
    return f"{name} ({n.name})" + (f" in {inside}" if inside else "")


STATISTICS = {"mean", "var", "std"}  # reductions that a normalization divides by


def _spelled(function: Any) -> str:
    """How a user writes a torch function: torch.cat, torch.nn.functional.group_norm (not
    torch.group_norm, a different function that F.group_norm calls)."""
    name = function.__name__
    for prefix, space in (("torch", torch), ("torch.nn.functional", torch.nn.functional)):
        if getattr(space, name, None) is function:
            return f"{prefix}.{name}"
    return ops.qualified_name(function)


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
        self.uf.where = _where(n)
        result = super().run_node(n)
        self.labels[n] = self.label(n, result)
        return result

    def label(self, n: torch.fx.Node, result: Any) -> Any:
        if n.op == "get_attr":
            return self.attribute(n.target, result)
        if n.op == "placeholder":
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
            kind = type(module)
            raise UnsupportedLayerError(
                f"module {n.target!r} ({kind.__name__}) is a layer the dependency graph does "
                f"not know, so it cannot tell how it couples channels (known: "
                f"{', '.join(known)}). Teach it in one line: penjing.prune.register_op("
                f"{kind.__module__}.{kind.__qualname__}, 'opaque') keeps the channels it reads "
                "and writes whole; 'same' if it acts on each channel alone, 'replay' if it "
                "only moves data"
            )
        if isinstance(n.target, type) and issubclass(n.target, tuple):
            return n.target(*call.largs, **call.lkwargs)  # a named tuple of outputs
        if n.op == "call_function":
            rule = ops.function_rule(n.target)
        else:
            rule = ops.METHOD_RULES.get(n.target)
        if rule is None:
            if n.op == "call_method":
                name, teach = n.target, repr(n.target)
            elif ops.qualified_name(n.target).startswith("torch."):
                name, teach = n.target.__name__, _spelled(n.target)
            else:
                name = ops.qualified_name(n.target)
                teach = repr(name)
            raise UnsupportedLayerError(
                f"op {name!r} at node {n.name!r} in {_module_of(n) or 'the model itself'} "
                f"is not one the dependency graph knows, so it cannot tell how it couples "
                f"channels ({n.format_node()}). Teach it in one line, e.g. "
                f"penjing.prune.register_op({teach}, 'same'), with one of the kinds "
                f"{sorted(ops.KINDS)} (see penjing.prune.structural.ops.KINDS)"
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
        op = _op_name(self.module, call.node)
        layout = op in ops.LAYOUT

        def swap(v, lv, data=True):
            # an integer or bool tensor beside the data is an index or a mask: its values
            # say where data moves, so it stays as it is
            if isinstance(v, torch.Tensor) and not data and not v.is_floating_point():
                return v
            if isinstance(v, torch.Tensor) and isinstance(lv, torch.Tensor):
                return lv if layout else lab.full(lv, v.shape)
            if isinstance(v, list | tuple) and isinstance(lv, list | tuple):
                return type(v)(swap(a, b, data) for a, b in zip(v, lv, strict=True))
            return v

        args = tuple(swap(v, lv, i == 0)
                     for i, (v, lv) in enumerate(zip(call.args, call.largs, strict=True)))
        kwargs = {k: swap(v, call.lkwargs.get(k), False) for k, v in call.kwargs.items()}
        node = call.node
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_module":
            out = self.module.get_submodule(node.target)(*args, **kwargs)
        else:
            out = node.target(*args, **kwargs)
        out = _compress_tree(out)
        if op in ops.JOINS:
            joined = self.join(call, out)
            if joined is not None:
                return joined
        tensors = call.tensors()
        if not tensors or not isinstance(call.args[0], torch.Tensor):
            return out
        return self.keep_consistent(call, *tensors[0], out)

    def join(self, call: _Call, out: Any) -> torch.Tensor | None:
        """cat / stack along a dim where no piece's channels vary (a class token before the
        patches, tensors stacked on a new dim): the pieces' channels become the same
        channels, so they are coupled. None when the pieces are joined along their channels
        (concatenating feature maps), which the plain replay already follows."""
        values, labels = call.arg(0, "tensors"), call.largs[0] if call.largs else None
        if not isinstance(values, list | tuple) or not isinstance(labels, list | tuple):
            return None
        if not all(isinstance(lv, torch.Tensor) for lv in labels) or not labels:
            return None
        stack = _op_name(self.module, call.node) == "stack"
        ndim = values[0].dim() + (1 if stack else 0)
        dim = _dim(call.arg(1, "dim", 0), ndim)
        if not stack and any(lv.shape[dim] > 1 for lv in labels):
            return None
        try:
            shape = torch.broadcast_shapes(*(lv.shape for lv in labels))
        except RuntimeError:
            return None
        base = labels[0].expand(shape).contiguous()
        for other in labels[1:]:
            self.uf.union_arrays(base.numpy(), other.expand(shape).contiguous().numpy())
        return lab.compress(base.unsqueeze(dim) if stack else base)

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
        node = call.node
        module = self.module.get_submodule(node.target) if node.op == "call_module" else None
        name = _op_name(self.module, node)
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
            if self.sized_by_another(node, before):
                return lab.pinned(out.dim())
            dims = lab.varying(out)
            if len(dims) > 1:  # prune the innermost of the split dims, the same in every block
                block = out.permute(*[d for d in range(out.dim()) if d not in dims], *dims)
                block = block.reshape(-1, out.shape[dims[-1]]).numpy()
                self.uf.union_arrays(block[:1], block)
            sizes = ops.written_sizes(node, module, value.dim())
            fixed = set(sizes) & set(lab.varying(self.roots(out)))
            if fixed and not self.sized_by_attribute(node, out, {d: sizes[d] for d in fixed}):
                self.uf.pin(before, f"{_where(node)} writes the size of a channel dim as a "
                            "number in the code")
                return lab.pinned(out.dim())
        return out

    def sized_by_another(self, node: torch.fx.Node, before: torch.Tensor) -> bool:
        """A reshape sized from another tensor's channel count (`q.reshape(b, t, h, d // h)`
        with d read off the block's input x): pruning must keep the two counts equal, which
        a channel set cannot say, so both keep their channels (pinned, True returned)."""
        source = node.args[0] if node.args else None
        reads = [r for a in (*node.args[1:], *node.kwargs.values()) for r in ops.shape_reads(a)]
        coupled = []
        for tensor, dim in reads:
            if tensor is source or not isinstance(self.labels.get(tensor), torch.Tensor):
                continue
            labels = self.labels[tensor]
            dims = lab.varying(labels) if dim is None else [_dim(dim, labels.dim())]
            if not any(labels.shape[d] > 1 for d in dims):
                continue
            # the same channels in another layout (a channel shuffle's view back) keep
            # the same count under any pruning
            mine = set(self.uf.roots(before.numpy()).ravel().tolist())
            if set(self.uf.roots(labels.numpy()).ravel().tolist()) != mine:
                coupled.append(tensor)
        if not coupled:
            return False
        why = (f"{_where(node)} takes a size from the shape of {coupled[0].name!r}, whose "
               "channel count must then stay")
        for tensor in coupled:
            self.uf.pin(self.labels[tensor], why)
        self.uf.pin(before, why)
        return True

    def sized_by_attribute(self, node: torch.fx.Node, out: torch.Tensor,
                           sizes: dict[int, int]) -> bool:
        """Whether each written size in `dims` is an int attribute of the module the op sits
        in (`x.reshape(n, self.hidden_dim, -1)`): the channels stay free, and surgery sets
        the attribute to the new count. A size that no attribute or several give is a
        number in the code, and pins its channels."""
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path = next((p for p, _ in reversed(stack)), "")
        owner = self.dep.model.get_submodule(path)
        found = []
        for d, size in sizes.items():
            names = [k for k, v in vars(owner).items() if not k.startswith("_")
                     and type(v) is int and v == size]
            if len(names) != 1:
                return False
            found.append((path, names[0], d))
        for path, attr, d in found:
            self.slot(path, f"@{attr}", 0, "size", lab.vector(out, d, out.shape[d]))
        return True

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
        op = _op_name(self.module, call.node)
        dims = call.arg(2 if op in ("norm", "vector_norm") else 1, "dim", None)  # after p / ord
        if isinstance(dims, torch.Tensor):  # torch.max(a, b) is element-wise
            return self.binary(call)
        dims = range(value.dim()) if dims is None else (dims if isinstance(dims, list | tuple)
                                                       else (dims,))
        dims = sorted({_dim(d, value.dim()) for d in dims})
        result = call.result[0] if isinstance(call.result, tuple) else call.result
        if any(labels.shape[d] > 1 for d in dims):
            if (op in STATISTICS and isinstance(result, torch.Tensor)
                    and result.dim() == value.dim()):
                # a statistic over the channels that broadcasts back onto them (GRN's mean
                # of the channel norms, like LayerNorm's): fewer channels change its value,
                # not its shape, so they stay free
                return _pinned_like(result)
            self.uf.pin(labels)  # summing over channels mixes them
            return _pinned_like(call.result)
        out = labels
        # read keepdim off the result: std and var take `unbiased` where others take keepdim
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
        """F.layer_norm over the last dim: its weight and bias (read from the model) are
        coupled to the channels; over several dims the channels stay."""
        shape = call.arg(1, "normalized_shape")
        count = 1 if isinstance(shape, int) else len(shape)
        value, labels = call.tensors()[0]
        if count != 1 or any(d != value.dim() - 1 for d in lab.varying(labels)):
            return self.along_dim(call, list(range(-count, 0)))
        channels = lab.vector(labels, value.dim() - 1, value.shape[-1])
        for i, name in ((2, "weight"), (3, "bias")):
            param = call.lkwargs.get(name) if len(call.largs) <= i else call.largs[i]
            if isinstance(param, torch.Tensor):
                self.uf.union_arrays(channels,
                                     lab.vector(param, param.dim() - 1, value.shape[-1]))
        return labels

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
        self.extra_tensors(m, fqn, out, None if g == cin == cout else inputs)
        return lab.along(out, 1, ndim)

    def linear(self, call: _Call, m: nn.Linear, fqn: str) -> torch.Tensor:
        value, labels = call.tensors()[0]
        ndim = call.result.dim()
        inputs = self.channel_vector(labels, value.dim() - 1, m.in_features)
        self.slot(fqn, "weight", 1, "in", inputs)
        out = self.produce(fqn, m.out_features)
        self.slot(fqn, "weight", 0, "out", out)
        if m.bias is not None:
            self.slot(fqn, "bias", 0, "out", out)
        self.extra_tensors(m, fqn, out, inputs)
        return lab.along(out, ndim - 1, ndim)

    def extra_tensors(self, m: nn.Module, fqn: str, out: np.ndarray,
                      inputs: np.ndarray | None) -> None:
        """Parameters and buffers that a subclass of Conv or Linear adds to weight and bias
        (timm's ScaledStdConv2d `gain`, one per filter). One value per output channel,
        shaped (out,) or (out, 1, ...), is sliced with the outputs; a single value needs
        nothing; any other shape keeps the layer's input and output channels whole, with a
        warning naming it, since how the layer's forward reads it is unknown."""
        role = self.dep.slots[(fqn, "weight", 0)].role
        named = [*m.named_parameters(), *m.named_buffers()]
        for name, tensor in named:
            if name in ("weight", "bias") or name.startswith("parametrizations."):
                continue
            if tensor.numel() <= 1:
                continue
            owner, _, leaf = name.rpartition(".")
            where = f"{fqn}.{owner}" if owner else fqn
            if tensor.shape[0] == len(out) and all(d == 1 for d in tensor.shape[1:]):
                self.slot(where, leaf, 0, role, out)
                continue
            why = (f"{fqn}.{name} of {type(m).__name__}, shaped {tuple(tensor.shape)}, is "
                   "not one value per output channel")
            self.uf.pin(out, why)
            if inputs is not None:
                self.uf.pin(inputs, why)
            warnings.warn(f"{why}: the channels of {fqn!r} stay whole. If it is per output "
                          "channel, give it the shape (out_channels, 1, ...) to have it pruned "
                          "with them", PenjingWarning, stacklevel=2)

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

    def _norm_slots(self, m: nn.Module, fqn: str, channels: np.ndarray) -> None:
        names = [n for n in ("weight", "bias") if getattr(m, n, None) is not None]
        for name in names or [""]:
            self.slot(fqn, name, 0, "norm", channels)

    def layer_norm(self, call: _Call, m: nn.LayerNorm, fqn: str) -> torch.Tensor:
        """LayerNorm over the last dim normalizes a residual stream's channels together;
        removing some renormalizes the rest over fewer, as after any width pruning, so its
        channels stay free, coupled to its weight and bias. Over several dims they stay."""
        value, labels = call.tensors()[0]
        last = value.dim() - 1
        if len(m.normalized_shape) != 1 or any(d != last for d in lab.varying(labels)):
            return self.along_dim(call, list(range(-len(m.normalized_shape), 0)))
        self._norm_slots(m, fqn, lab.vector(labels, last, m.normalized_shape[0]))
        return labels

    def group_norm(self, call: _Call, m: nn.GroupNorm, fqn: str) -> torch.Tensor:
        """GroupNorm: every group keeps the same count, so position p goes in all groups."""
        value, labels = call.tensors()[0]
        channels = self.channel_vector(labels, 1, m.num_channels)
        grid = channels.reshape(m.num_groups, -1)
        self.uf.union_arrays(grid[:1], grid)
        self._norm_slots(m, fqn, channels)
        return labels

    def attention(self, call: _Call, m: nn.MultiheadAttention, fqn: str) -> Any:
        """nn.MultiheadAttention: its width is its input's, so the stream's channel p, the
        p-th row of each of q, k, v and the p-th column and row of out_proj go together, and
        position p of a head goes in every head (all keep one head size)."""
        names = ("query", "key", "value")
        given = [(call.arg(i, n), call.largs[i] if len(call.largs) > i else call.lkwargs.get(n))
                 for i, n in enumerate(names)]
        if (not m._qkv_same_embed_dim or m.bias_k is not None or
                not all(isinstance(v, torch.Tensor) and isinstance(lv, torch.Tensor)
                        for v, lv in given)):
            return self.opaque(call)
        width, heads = m.embed_dim, m.num_heads
        last = given[0][0].dim() - 1
        channels = [self.channel_vector(lv, last, width) for _, lv in given]
        for other in channels[1:]:
            self.uf.union_arrays(channels[0], other)
        base = channels[0]
        grid = base.reshape(heads, -1)
        self.uf.union_arrays(grid[:1], grid)
        rows = np.concatenate([base] * 3)
        self.slot(fqn, "in_proj_weight", 1, "in", base)
        self.slot(fqn, "in_proj_weight", 0, "out", rows)
        if m.in_proj_bias is not None:
            self.slot(fqn, "in_proj_bias", 0, "out", rows)
        out = f"{fqn}.out_proj" if fqn else "out_proj"
        self.slot(out, "weight", 1, "in", base)
        self.slot(out, "weight", 0, "out", base)
        if m.out_proj.bias is not None:
            self.slot(out, "bias", 0, "out", base)
        result = call.result
        first = result[0] if isinstance(result, tuple) else result
        labels = lab.along(base, first.dim() - 1, first.dim())
        return (labels, _pinned_like(result[1])) if isinstance(result, tuple) else labels

    def window_attention(self, call: _Call) -> torch.Tensor:
        """torchvision's shifted_window_attention(x, qkv_weight, proj_weight, ...): it takes
        the head size from the input's width, so as in nn.MultiheadAttention the input's
        channel p, the p-th row of each of q, k, v and proj's p-th column go together, and
        position p of a head goes in every head. The output is proj's rows."""
        value, labels = call.tensors()[0]
        last = value.dim() - 1
        width = value.shape[last]
        nodes, kwargs = call.node.args, call.node.kwargs
        heads = call.arg(5, "num_heads")
        params = {name: nodes[i] if len(nodes) > i else kwargs.get(name)
                  for i, name in ((1, "qkv_weight"), (2, "proj_weight"), (9, "qkv_bias"),
                                  (10, "proj_bias"))}
        if not (isinstance(heads, int) and width % heads == 0 and all(
                isinstance(params[k], torch.fx.Node) and params[k].op == "get_attr"
                for k in ("qkv_weight", "proj_weight"))):
            return self.opaque(call)
        used = {nodes[0] if nodes else kwargs.get("input"), *params.values()}
        for arg, arg_labels in [*zip(nodes, call.largs, strict=False),
                                *((kwargs[k], call.lkwargs[k]) for k in kwargs)]:
            if arg not in used:  # the position bias and logit scale keep every head
                self._pin_value(arg_labels)
        base = self.channel_vector(labels, last, width)
        grid = base.reshape(heads, -1)
        self.uf.union_arrays(grid[:1], grid)
        rows = np.concatenate([base] * 3)
        qkv = params["qkv_weight"].target.rpartition(".")[0]
        proj = params["proj_weight"].target.rpartition(".")[0]
        self.slot(qkv, "weight", 1, "in", base)
        self.slot(qkv, "weight", 0, "out", rows)
        if isinstance(params["qkv_bias"], torch.fx.Node):
            self.slot(qkv, "bias", 0, "out", rows)
        self.slot(proj, "weight", 1, "in", base)
        out = self.produce(proj, call.result.shape[-1])
        self.slot(proj, "weight", 0, "out", out)
        if isinstance(params["proj_bias"], torch.fx.Node):
            self.slot(proj, "bias", 0, "out", out)
        return lab.along(out, call.result.dim() - 1, call.result.dim())

    def attribute(self, target: str, value: Any) -> Any:
        """A parameter or buffer that forward reads directly (a layer scale, a class token,
        a position embedding): its channels run along its last dim longer than 1; the ops
        that read it couple them to the model's. Integer tensors (indices) stay whole."""
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return _pinned_like(value)
        dims = [d for d in range(value.dim()) if value.shape[d] > 1]
        if not dims:
            return _pinned_like(value)
        dim = dims[-1]
        fqn, _, name = target.rpartition(".")
        owner = self.dep.model.get_submodule(fqn)
        if not isinstance(getattr(owner, name, None), torch.Tensor):
            return _pinned_like(value)
        labels = self.produce(f"{target}@{dim}", value.shape[dim])
        self.slot(fqn, name, dim, "norm", labels)
        return lab.along(labels, dim, value.dim())

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


