"""Why the dependency graph couples or keeps channels, in words: `explain(model, x)`.

For every group: how many channels, which layers make them and which read them. For every
layer whose channels stay (pinned): how many, and the reasons the graph recorded — the op
that pinned them, or the model input, output or constant they meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from penjing.prune.structural.graph import DependencyGraph, dependency_graph
from penjing.prune.structural.labels import PIN


@dataclass(frozen=True)
class Pinned:
    """Channels of one layer that no pruning may remove, and why."""

    fqn: str
    name: str
    dim: int
    count: int  # channels that stay
    total: int
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        why = "; ".join(self.reasons) or "unknown"
        return (f"{self.fqn or '<model>'}.{self.name or '*'}[{self.dim}]: {self.count} of "
                f"{self.total} channels stay: {why}")


def pinned(graph: DependencyGraph, roles: tuple[str, ...] = ("out", "dw")) -> list[Pinned]:
    """The slots of layers that make channels (by default) with pinned channels, and why."""
    found = []
    for slot in sorted(graph.slots.values(), key=lambda s: s.order):
        if slot.role not in roles:
            continue
        roots = graph.sets.roots(slot.labels)
        stay = roots == PIN
        if not stay.any():
            continue
        reasons: list[str] = []
        for element in np.unique(slot.labels[stay]):
            for reason in graph.sets.reasons(int(element)):
                if reason not in reasons:
                    reasons.append(reason)
            if len(reasons) >= 3:
                break
        found.append(Pinned(slot.fqn, slot.name, slot.dim, int(stay.sum()), len(roots),
                            tuple(reasons[:3])))
    return found


def explain(model: nn.Module, example_inputs: Any) -> str:
    """A report of the channel groups of `model` and of the channels that must stay.

    >>> print(pj.prune.explain(model, torch.randn(1, 3, 224, 224)))
    """
    graph = dependency_graph(model, example_inputs)
    groups = graph.groups()
    lines = [f"{len(groups)} prunable group(s)"]
    for i, group in enumerate(groups):
        readers = [f for f in dict.fromkeys(s.fqn for s in group.slices if s.role == "in")]
        lines.append(f"  group {i}: {len(group)} channels, made by {group.producers}, "
                     f"read by {readers}")
    stay = pinned(graph)
    lines.append(f"{len(stay)} layer output(s) with channels that stay")
    lines += [f"  {p}" for p in stay]
    return "\n".join(lines)
