"""Channel labels' disjoint sets: union_arrays unites whole arrays at once, with the same
sets and pin reasons as uniting every pair in order."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from penjing.prune.structural.labels import PIN, UnionFind


def _pair_by_pair(sets: UnionFind, a, b) -> None:
    """union_arrays as every pair in order, one `union` each."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    a, b = a.ravel(), b.ravel()
    keys = np.unique(a[a != b] * len(sets.parent) + b[a != b])
    for x, y in zip((keys // len(sets.parent)).tolist(), (keys % len(sets.parent)).tolist(),
                    strict=True):
        sets.union(x, y)


def _state(sets: UnionFind, n: int) -> tuple:
    return ([sets.find(i) for i in range(n)], [sets._find(sets.shadow, i) for i in range(n)],
            [sets.reasons(i) for i in range(n)], sets.why)


@pytest.mark.parametrize("seed", range(40))
def test_union_arrays_gives_the_sets_and_reasons_of_pair_by_pair_unions(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    fast = UnionFind()
    fast.new(n - 1)
    low = 0 if seed % 2 else 1  # even seeds: no pair with PIN
    for step in range(12):
        fast.where = f"op {step}"
        if seed % 2 and rng.random() < 0.3:
            fast.pin(rng.integers(0, n, size=3), f"pinned at {step}")
            continue
        m = int(rng.integers(1, 3 * n))
        a, b = rng.integers(low, n, size=m), rng.integers(low, n, size=m)
        if rng.random() < 0.3:  # broadcast: a column against a row, as a mul of two labels
            a, b = rng.integers(max(low, 1), n, size=(m, 1)), rng.integers(low, n, size=(1, 5))
        slow = copy.deepcopy(fast)
        fast.union_arrays(a, b)
        _pair_by_pair(slow, a, b)
        assert _state(fast, n) == _state(slow, n)


def test_free_sets_merge_rooted_at_their_lowest_element():
    sets = UnionFind()
    sets.new(8)
    sets.union_arrays(np.array([8, 7, 5]), np.array([2, 6, 7]))
    assert [sets.find(i) for i in range(9)] == [PIN, 1, 2, 3, 4, 5, 5, 5, 2]
    assert sets.reasons(5) == []
