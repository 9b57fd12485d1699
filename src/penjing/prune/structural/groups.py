"""Groups of coupled channels: the one unit that scoring, selection and surgery act on.

A *channel* of a group is one set of coupled indices (filter 5 of conv1, entry 5 of bn1,
input channel 5 of conv2, features 5·49 … 5·49+48 of the linear after a flatten, ...).
Channels touching exactly the same tensor dims form one group, so "prune half of this
group" means half of those filters and everything that reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from penjing.prune.structural.labels import PIN

if TYPE_CHECKING:
    from penjing.prune.structural.graph import DependencyGraph


@dataclass(frozen=True)
class Slice:
    """The indices along one dim of one module tensor that each channel of a group owns."""

    fqn: str
    name: str  # "weight", "bias", "running_mean", ... or "" for an attribute-only layer
    dim: int
    role: str  # "out" (makes the channel), "in" (reads it), "norm" or "dw" (per channel)
    indices: tuple[np.ndarray, ...]  # one array per channel of the group

    def tensor(self, model: nn.Module) -> torch.Tensor | None:
        if not self.name:
            return None
        return getattr(model.get_submodule(self.fqn), self.name)


@dataclass(frozen=True)
class Group:
    """Channels that must be removed together, and every tensor slice that each one owns."""

    channels: tuple[int, ...]  # set ids from the dependency graph, one per prunable channel
    slices: tuple[Slice, ...]

    def __len__(self) -> int:
        return len(self.channels)

    @property
    def producers(self) -> list[str]:
        """Modules whose outputs are these channels (the layers a user thinks of pruning)."""
        return list(dict.fromkeys(s.fqn for s in self.slices if s.role in ("out", "dw")))

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(s.fqn for s in self.slices))

    def only(self, roles: Iterable[str]) -> Group:
        """The same channels seen through the slices with one of `roles` only (for scoring)."""
        roles = set(roles)
        return Group(self.channels, tuple(s for s in self.slices if s.role in roles))

    def __repr__(self) -> str:
        touched = ", ".join(f"{s.fqn or '<model>'}.{s.name or '*'}[{s.dim}]"
                            for s in self.slices)
        return f"Group({len(self)} channels: {touched})"


def build_groups(graph: DependencyGraph) -> list[Group]:
    """Split the graph's coupled sets into groups of channels with the same footprint."""
    owned: dict[int, dict[tuple, np.ndarray]] = {}
    slots = sorted(graph.slots.values(), key=lambda s: s.order)
    for slot in slots:
        roots = graph.sets.roots(slot.labels)
        order = np.argsort(roots, kind="stable")
        uniq, starts = np.unique(roots[order], return_index=True)
        for root, idx in zip(uniq, np.split(order, starts[1:]), strict=True):
            if root != PIN:
                owned.setdefault(int(root), {})[(slot.fqn, slot.name, slot.dim)] = idx
    by_footprint: dict[Any, list[int]] = {}
    for root, parts in owned.items():
        if not any(graph.slots[key].role in ("out", "dw") for key in parts):
            continue  # no layer makes these channels (a parameter read alone): nothing to cut
        footprint = tuple((key, len(idx)) for key, idx in parts.items())
        by_footprint.setdefault(footprint, []).append(root)
    groups = []
    for footprint, roots in by_footprint.items():
        slices = []
        for key, _ in footprint:
            slot = graph.slots[key]
            slices.append(Slice(slot.fqn, slot.name, slot.dim, slot.role,
                                tuple(owned[r][key] for r in roots)))
        groups.append(Group(tuple(roots), tuple(slices)))
    first = {(s.fqn, s.name, s.dim): s.order for s in slots}
    groups.sort(key=lambda g: min(first[(s.fqn, s.name, s.dim)] for s in g.slices))
    return groups
