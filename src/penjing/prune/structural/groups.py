"""Groups of coupled channels: the one unit that scoring, selection and surgery act on.

A *channel* of a group is one set of coupled indices (filter 5 of conv1, entry 5 of bn1,
input channel 5 of conv2, features 5·49 … 5·49+48 of the linear after a flatten, ...).
Channels touching exactly the same tensor dims form one group, so "prune half of this
group" means half of those filters and everything that reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    # row c: the indices channel c owns (every channel of a group owns as many of a slice)
    indices: np.ndarray

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
    """Split the graph's coupled sets into groups of channels with the same footprint.

    A set's footprint is the slots it has indices in, in slot order, with how many in
    each. All sets' footprints are found at once, slot by slot: each footprint so far is a
    number, and a slot gives the sets it holds a new number for each (number, count) it
    sees, so two sets end with one number exactly when their footprints are the same.
    """
    slots = sorted(graph.slots.values(), key=lambda s: s.order)
    size = len(graph.sets.parent)
    footprint = np.zeros(size, dtype=np.int64)  # 0: in no slot yet
    steps = [(0, -1, 0)]  # footprint number → (the one before, slot, count there)
    start = np.full(size, len(slots))  # the first slot a set is in
    made = np.zeros(size, dtype=bool)  # a layer makes the set's channels (out or dw)
    found = []  # per slot: its positions by set, and where each set's positions begin
    for i, slot in enumerate(slots):
        roots = graph.sets.roots(slot.labels)
        order = np.argsort(roots, kind="stable")
        sets, begins, counts = np.unique(roots[order], return_index=True, return_counts=True)
        free = sets != PIN
        sets, begins, counts = sets[free], begins[free], counts[free]
        found.append((order, sets, begins))
        # one int64 key per (footprint so far, count): counts are below the slot's length
        pairs, new = np.unique(footprint[sets] * (len(roots) + 1) + counts, return_inverse=True)
        steps += [(int(k) // (len(roots) + 1), i, int(k) % (len(roots) + 1))
                  for k in pairs.tolist()]
        footprint[sets] = len(steps) - len(pairs) + new.reshape(-1)
        start[sets] = np.minimum(start[sets], i)
        if slot.role in ("out", "dw"):
            made[sets] = True
    # no layer makes a set only read (a parameter read alone): nothing to cut
    channels = np.nonzero((footprint > 0) & made)[0]
    # channels in the order the slots first meet them; a group's channels share that slot
    channels = channels[np.argsort(start[channels], kind="stable")]
    numbers, first = np.unique(footprint[channels], return_index=True)
    groups = []
    for number in numbers[np.argsort(first, kind="stable")].tolist():
        members = channels[footprint[channels] == number]
        path = []
        while number:
            number, i, count = steps[number]
            path.append((i, count))
        slices = []
        for i, count in reversed(path):
            slot, (order, sets, begins) = slots[i], found[i]
            rows = begins[np.searchsorted(sets, members)]
            slices.append(Slice(slot.fqn, slot.name, slot.dim, slot.role,
                                order[rows[:, None] + np.arange(count)]))
        groups.append(Group(tuple(members.tolist()), tuple(slices)))
    return groups
