"""Channel labels: which prunable channel each entry of an activation belongs to.

Every output channel of a conv or linear layer is an *element* with an integer id. While the
dependency graph runs a model, each activation carries a label tensor: an int64 tensor of
the activation's rank whose entries are element ids, kept small by storing size 1 along
every dim where the labels do not vary (a conv output's labels vary along the channel dim
only). Ops that move data (view, permute, cat, chunk, getitem, ...) are simply replayed on
the label tensor, so concat, flatten→linear and channel shuffles need no special code.
Ops that combine tensors (add, mul) unite the elements they line up: those channels must be
pruned together. Element 0, PIN, stands for "must be kept": model inputs, outputs, constants
and anything whose channels an op mixes are united with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PIN = 0


@dataclass
class Slot:
    """One dim of one tensor of one module, with the element id of each index along it."""

    fqn: str  # module path; "" is the model itself
    name: str  # parameter or buffer name, "" when the module has none (attribute only)
    dim: int
    role: str  # "out": the layer makes these channels; "in": it reads them; "norm"/"dw": both
    labels: np.ndarray
    order: int  # when the slot was first met, for a stable group order


class UnionFind:
    """Disjoint sets over element ids 0..n-1 (0 is PIN), grown as layers create channels.

    Beside the sets, a *shadow* forest records the same unions except those with PIN, and
    each shadow set keeps the reasons its elements were pinned: `reasons(x)` says why x
    must stay (the op that pinned it or a channel it is coupled to), for explanations.
    """

    MAX_REASONS = 4

    def __init__(self) -> None:
        self.parent: list[int] = [PIN]
        self.shadow: list[int] = [PIN]
        self.why: dict[int, list[str]] = {PIN: ["a model input, output or constant"]}
        self.where = ""  # the op being labelled, named in the reasons of what it pins
        self._all: np.ndarray | None = None  # every element's root, while no union happens

    def new(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.shadow.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    @staticmethod
    def _find(parent: list[int], a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression keeps later finds O(1)
            parent[a], a = root, parent[a]
        return root

    def find(self, a: int) -> int:
        return self._find(self.parent, a)

    def _shadow_union(self, a: int, b: int) -> None:
        ra, rb = self._find(self.shadow, a), self._find(self.shadow, b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.shadow[rb] = ra
        moved = self.why.pop(rb, None)
        if moved:
            mine = self.why.setdefault(ra, [])
            mine += [r for r in moved if r not in mine][: self.MAX_REASONS - len(mine)]

    def union(self, a: int, b: int) -> None:
        if a == PIN or b == PIN:
            where = f" at {self.where}" if self.where else ""
            self._pin_one(b if a == PIN else a, f"it meets a model input, output or "
                                                  f"constant{where}")
            return
        self._shadow_union(a, b)
        self._link(a, b)

    def _link(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self._all = None
        # PIN stays the root of its set so "is pinned" is find(x) == PIN.
        if rb == PIN or (ra != PIN and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra

    def _pin_one(self, x: int, why: str) -> None:
        if x != PIN and self.find(x) != PIN:
            reasons = self.why.setdefault(self._find(self.shadow, x), [])
            if why not in reasons and len(reasons) < self.MAX_REASONS:
                reasons.append(why)
        self._link(PIN, x)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite a[i] with b[i] for every i (arrays broadcast against each other).

        The pairs are taken in a fixed order (by a[i], then b[i]). When no pinned set is
        among them, only the sets change, and the merged sets are the same in any order:
        they are merged at once. Otherwise the reasons pinned sets carry move with every
        union, so the pairs go through `union` one by one, but only those that join two
        sets: the others change nothing, and which they are follows from the order alone.
        """
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        a, b = a.ravel(), b.ravel()
        differ = a != b
        # one int64 key per pair: np.unique on a flat array, not on rows
        keys = np.unique(a[differ] * len(self.parent) + b[differ])
        x, y = keys // len(self.parent), keys % len(self.parent)
        pinning = (x == PIN) | (y == PIN)
        # the shadow forest takes the pairs without PIN; a pair the shadow forest finds
        # together, the main forest (which has every union the shadow has) does too
        roots, u, v = self._numbered(self.shadow, x[~pinning], y[~pinning])
        if not pinning.any() and self.why.keys().isdisjoint(roots.tolist()):
            # A set with no reasons is not pinned, and the main forest differs from the
            # shadow only in what is pinned: the same sets, the same roots, in both.
            self._merge(self.shadow, roots, u, v)
            self._merge(self.parent, roots, u, v)
            return
        joins = np.zeros(len(keys), dtype=bool)
        joins[~pinning] = self._spanning(u, v, len(roots))[0]
        if pinning.any():  # a pair with PIN pins its other element unless that already is
            main, mu, mv = self._numbered(self.parent, x, y)
            joins |= pinning & self._spanning(mu, mv, len(main))[0]
        for p, q in zip(x[joins].tolist(), y[joins].tolist(), strict=True):
            self.union(p, q)

    def _numbered(self, parent: list[int], x: np.ndarray,
                  y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The roots of the sets that the pairs (x[i], y[i]) meet in `parent`'s forest,
        sorted, and each pair's two sets as positions in them."""
        ends, inverse = np.unique(np.concatenate([x, y]), return_inverse=True)
        found = np.array([self._find(parent, e) for e in ends.tolist()], dtype=np.int64)
        roots, sets = np.unique(found, return_inverse=True)
        sets = sets.reshape(-1)
        return roots, sets[inverse[:len(x)]], sets[inverse[len(x):]]

    def _merge(self, parent: list[int], roots: np.ndarray, u: np.ndarray,
               v: np.ndarray) -> None:
        """Unite the sets u[i] and v[i] (positions in `roots`) in `parent`'s forest at once,
        each merged set rooted at its lowest root, as `_link` roots it."""
        merged = self._spanning(u, v, len(roots))[1]
        lowest = np.full(len(roots), np.iinfo(np.int64).max)
        np.minimum.at(lowest, merged, roots)
        new = lowest[merged]
        moved = new != roots
        for root, to in zip(roots[moved].tolist(), new[moved].tolist(), strict=True):
            parent[root] = to
        if moved.any():
            self._all = None

    @staticmethod
    def _spanning(u: np.ndarray, v: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """For the pairs (u[i], v[i]) of sets numbered below `count`, united in order:
        which pairs join two sets, and the number of the merged set each set ends in.

        The joining pairs are the minimum spanning forest of the pairs with pair i
        weighing i, which Borůvka's rounds find with array operations: every set takes its
        lightest pair to another set, and the sets so joined merge, until no pair joins
        two sets."""
        chosen = np.zeros(len(u), dtype=bool)
        ids = np.arange(count)
        merged = ids.copy()  # each set's merged set, as the number of one of its sets
        pair = np.arange(len(u))
        while True:
            u, v = merged[u], merged[v]
            live = u != v
            if not live.any():
                return chosen, merged
            u, v, pair = u[live], v[live], pair[live]
            lightest = np.full(count, len(chosen))
            np.minimum.at(lightest, u, pair)
            np.minimum.at(lightest, v, pair)
            joined = np.nonzero(lightest < len(chosen))[0]
            where = np.searchsorted(pair, lightest[joined])  # pair stays sorted
            chosen[pair[where]] = True
            # each joined set points to the set across its lightest pair; two sets that
            # chose the same pair point to each other, and the lower one stays a root
            to = merged.copy()
            to[joined] = np.where(u[where] == joined, v[where], u[where])
            mutual = (to[to] == ids) & (ids < to)
            to[mutual] = ids[mutual]
            while True:
                up = to[to]
                if np.array_equal(up, to):
                    break
                to = up
            merged = to

    def pin(self, labels: np.ndarray | torch.Tensor, why: str | None = None) -> None:
        """Keep every element in `labels`; `why` (default: the op being labelled) is
        remembered for `reasons`."""
        values = labels.numpy() if isinstance(labels, torch.Tensor) else labels
        why = why or self.where or "pinned"
        for x in np.unique(values):
            self._pin_one(int(x), why)

    def reasons(self, x: int) -> list[str]:
        """Why element `x` is pinned (empty when it is free)."""
        if self.find(x) != PIN:
            return []
        return list(self.why.get(self._find(self.shadow, x), [])) or list(self.why[PIN])

    def freeze(self) -> None:
        """Find every element's root at once (pointer doubling), for fast `roots` until
        the next union."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        self._all = parent

    def roots(self, labels: np.ndarray) -> np.ndarray:
        if self._all is not None and len(self._all) == len(self.parent):
            return self._all[np.asarray(labels)]
        flat = np.asarray(labels).ravel()
        uniq, inverse = np.unique(flat, return_inverse=True)
        found = np.array([self.find(int(x)) for x in uniq], dtype=np.int64)
        return found[inverse].reshape(np.shape(labels))


def pinned(ndim: int) -> torch.Tensor:
    """Labels of a tensor none of whose channels may be removed."""
    return torch.zeros([1] * ndim, dtype=torch.int64)


def compress(labels: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which the labels are constant to size 1."""
    out = labels
    for d in range(out.dim()):
        if out.shape[d] > 1:
            first = out.narrow(d, 0, 1)
            if bool((out == first).all()):
                out = first
    return out.contiguous()


def varying(labels: torch.Tensor) -> list[int]:
    """The dims along which labels change."""
    return [d for d in range(labels.dim()) if labels.shape[d] > 1]


def full(labels: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The labels materialized to an activation's real shape, for replaying a data-movement op."""
    return labels.expand(shape).contiguous()


def vector(labels: torch.Tensor, dim: int, size: int) -> np.ndarray:
    """The 1-D labels along `dim` (constant along every other dim), of length `size`."""
    index = [0] * labels.dim()
    index[dim] = slice(None)
    line = labels[tuple(index)].reshape(-1).numpy()
    return np.broadcast_to(line, (size,)).copy() if line.size == 1 else line.copy()


def along(values: np.ndarray, dim: int, ndim: int) -> torch.Tensor:
    """A label tensor of rank `ndim` that varies along `dim` only."""
    shape = [1] * ndim
    shape[dim] = len(values)
    return compress(torch.as_tensor(values, dtype=torch.int64).reshape(shape))
