"""The dependency graph of a model's channels, found by tracing it with torch.fx.

`dependency_graph(model, example_inputs)` traces the model once and runs the traced graph on
the example inputs while propagating channel labels (see `penjing.prune.labels` and
`penjing.prune.propagate`). Each layer records *slots*: one dim of one parameter or buffer
(conv weight dim 0 = its filters, dim 1 = its input channels, BatchNorm running_mean dim 0,
...) with the element id of every index along that dim. Elements that must be removed
together end up in one set; a set is the unit that scoring and surgery act on (see
`penjing.prune.groups`).

An op the graph does not know is an error that names the node, never silently treated as
element-wise. Ops whose channel coupling cannot be expressed by removing channels (LayerNorm
over the channel dim, softmax over channels, matmul contractions, MultiheadAttention) *pin*
their channels: those stay, everything else can still be pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from penjing import tracing
from penjing.prune import ops
from penjing.prune.labels import Slot, UnionFind
from penjing.prune.propagate import Propagator
from penjing.train import eval_mode

__all__ = ["DependencyGraph", "Slot", "dependency_graph", "trace"]


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


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model as a torch.fx GraphModule sharing its layers; untraceable → a clear error."""
    return tracing.trace(
        model, ops.LEAVES,
        advice="Structured pruning needs a forward without Python control flow on tensor "
        "values; rewrite that part or move it outside the model",
    )


def dependency_graph(
    model: nn.Module, example_inputs: torch.Tensor | tuple[Any, ...]
) -> DependencyGraph:
    """Trace `model`, run it once on `example_inputs` and record how its channels are coupled.

    The model is run in eval mode under no_grad, so BatchNorm statistics do not move.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    gm = trace(model)
    graph = DependencyGraph(model)
    with eval_mode(model), torch.no_grad():
        Propagator(gm, graph).run(*inputs)
    return graph
