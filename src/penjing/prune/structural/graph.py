"""The dependency graph of a model's channels, found by tracing it with torch.fx.

`dependency_graph(model, example_inputs)` traces the model once and runs the traced graph on
the example inputs while propagating channel labels (see `labels` and `propagate` beside
this module). Each layer records *slots*: one dim of one parameter or buffer (conv weight
dim 0 = its filters, dim 1 = its input channels, BatchNorm running_mean dim 0,
...) with the element id of every index along that dim. Elements that must be removed
together end up in one set; a set is the unit that scoring and surgery act on (see
`penjing.prune.structural.groups`).

An op the graph does not know is an error that names the node, never silently treated as
element-wise. Ops whose channel coupling cannot be expressed by removing channels (LayerNorm
over the channel dim, softmax over channels, matmul contractions, MultiheadAttention) *pin*
their channels: those stay, everything else can still be pruned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import stateless

from penjing import tracing
from penjing.core.modes import eval_mode
from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.prune.structural import ops
from penjing.prune.structural.groups import build_groups
from penjing.prune.structural.labels import Slot, UnionFind
from penjing.prune.structural.propagate import Propagator

__all__ = ["DependencyGraph", "Slot", "dependency_graph", "trace"]


@dataclass
class DependencyGraph:
    """Which indices of which tensors are coupled, for one model and one input shape."""

    model: nn.Module
    slots: dict[tuple[str, str, int], Slot] = field(default_factory=dict)
    sets: UnionFind = field(default_factory=UnionFind)

    def groups(self):
        """The prunable groups of coupled channels (see `penjing.prune.structural.groups.Group`)."""
        self.sets.freeze()
        return build_groups(self)


# Layers whose channels their weights fix, whatever a subclass's forward adds (padding, an
# activation): the graph keeps them whole. Other torch.nn layers are kept whole only with
# their stock forward; a subclass that overrides it (a LayerNorm over channels that
# permutes first) is traced into, so the graph sees what it really normalizes.
_WHOLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.Embedding,
          nn.MultiheadAttention, nn.PReLU)


def _whole(module: nn.Module) -> bool:
    cls = tracing.layer_class(module)
    if cls is None:
        return False
    return isinstance(module, _WHOLE) or type(module).forward is cls.forward


def trace(model: nn.Module, *, training: bool = False) -> torch.fx.GraphModule:
    """The model as a torch.fx GraphModule sharing its layers; untraceable → a clear error.

    `training=True` traces the forward of train mode (auxiliary heads, for example)."""
    was = model.training
    model.train(training)
    try:
        return tracing.trace(model, tuple(ops.LEAVES), whole=_whole, advice=_advice(model))
    finally:
        model.train(was)


def _advice(model: nn.Module) -> str:
    """What to do about a forward torch.fx cannot trace."""
    if any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return ("For a Hugging Face transformers model, prune attention heads and FFN neurons "
                "with penjing.prune.hf_heads_ and penjing.prune.hf_ffn_, which need no trace")
    return ("Structured pruning needs a forward without Python control flow on tensor values. "
            "When the failing part is a module, register its class to be kept whole: "
            "penjing.prune.register_op(TheClass, 'opaque') leaves the channels it reads and "
            "writes as they are ('same' if it acts on each channel alone); else rewrite that "
            "part or move it outside the model")


def _unreached(model: nn.Module, gm: torch.fx.GraphModule) -> list[str]:
    """Modules with parameters of their own that the traced forward never calls (itself
    or inside a layer it calls) nor reads a tensor of."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    read = {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}

    def covered(name: str) -> bool:
        parts = name.split(".")
        return name in read or any(".".join(parts[:i]) in called
                                   for i in range(1, len(parts) + 1))

    return [name for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False)) and not covered(name)]


def dependency_graph(
    model: nn.Module, example_inputs: torch.Tensor | tuple[Any, ...]
) -> DependencyGraph:
    """Trace `model`, run it once on `example_inputs` and record how its channels are coupled.

    The model is run in eval mode under no_grad, so BatchNorm statistics do not move.
    Layers that only train mode calls (auxiliary classifiers) are found by tracing train
    mode's forward as well, so pruning keeps them consistent; layers neither mode calls
    are named in a warning and left as they are.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    gm = trace(model)
    missing = _unreached(model, gm)
    if missing:
        try:
            trained = trace(model, training=True)
        except UnsupportedLayerError:
            trained = None
        if trained is not None and len(_unreached(model, trained)) < len(missing):
            gm, missing = trained, _unreached(model, trained)
    if missing:
        warnings.warn(
            f"forward never calls {missing[:6]}{' ...' if len(missing) > 6 else ''} in eval "
            "or train mode: they are left as they are, and fail if they read channels that "
            "pruning removes", PenjingWarning, stacklevel=3)
    with eval_mode(model), torch.no_grad():
        graph = DependencyGraph(model)
        try:
            meta = _on_meta(model, gm, inputs)
            if meta is not None:
                return meta
            Propagator(gm, graph).run(*inputs)
        except UnsupportedLayerError as err:  # without the graph dump fx appends
            raise UnsupportedLayerError(str(err).split("\n\nWhile executing")[0]) from None
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                      for t in inputs]
            first = str(err).split("\n")[0]
            raise ValueError(
                f"{type(model).__name__} does not run on the example inputs {shapes}: at "
                f"{graph.sets.where or 'its forward'}: {first}. Pass example inputs of the "
                "shapes and types the model's forward takes (a tuple for several inputs)"
            ) from None
    return graph


def _on_meta(model: nn.Module, gm: torch.fx.GraphModule, inputs: tuple) -> DependencyGraph | None:
    """The graph from a run on the meta device: shapes without arithmetic, so a large model
    costs no forward pass. None when the model does not run there (an op without a meta
    kernel, a tensor made on the CPU in forward, Python that reads tensor values); the
    caller then runs it for real."""
    def meta(t: Any) -> Any:
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    swapped = {name: meta(t) for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    graph = DependencyGraph(model)
    try:
        with stateless._reparametrize_module(gm, swapped):
            Propagator(gm, graph).run(*(meta(t) for t in inputs))
    except UnsupportedLayerError:
        raise  # an op the graph does not know: a real run would say the same
    except Exception:  # noqa: BLE001 - any other failure on meta means: run it for real
        return None
    return graph
