from __future__ import annotations

import numpy as np
import pytest

from penjing.quant import kmeans_1d


@pytest.mark.parametrize("init", ["linear", "density", "forgy"])
@pytest.mark.parametrize("k", [1, 2, 31, 256])
def test_invariants(init, k):
    values = np.random.default_rng(0).standard_t(df=3, size=20_000).astype(np.float32)
    result = kmeans_1d(values, k, init=init)
    c = result.centroids
    assert c.size <= k and np.all(np.diff(c) >= 0)
    assert np.unique(c[result.labels]).size <= k
    # Each value sits at its nearest centroid (up to float32 rounding of the midpoints).
    spread = float(values.max() - values.min())
    distance = np.abs(values[:, None].astype(np.float64) - c[None, :])
    assigned = distance[np.arange(values.size), result.labels]
    assert np.all(assigned <= distance.min(axis=1) + 1e-6 * spread)
    # Each centroid is the mean of its members (a Lloyd fixed point, up to the tolerance).
    for j in np.unique(result.labels):
        mean = values[result.labels == j].astype(np.float64).mean()
        assert abs(c[j] - mean) <= 1e-4 * spread


def test_few_distinct_values_are_kept_exactly():
    values = np.array([3.0, -1.0, 3.0, 0.5, -1.0])
    result = kmeans_1d(values, 8)
    assert np.array_equal(result.centroids[result.labels], values)


def test_matches_brute_force_lloyd_from_same_start():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(-1, 0.2, 500), rng.normal(2, 0.5, 500)])
    result = kmeans_1d(values, 4, init="linear")
    c = np.linspace(values.min(), values.max(), 4)
    for _ in range(300):
        labels = np.abs(values[:, None] - c[None, :]).argmin(axis=1)
        c = np.array([values[labels == j].mean() if np.any(labels == j) else c[j]
                      for j in range(4)])
    assert np.allclose(np.sort(c), result.centroids, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(np.array([]), 4)
    with pytest.raises(ValueError, match="init"):
        kmeans_1d(np.ones(3), 2, init="kmeans++")
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(np.array([1.0, np.nan]), 2)
    with pytest.raises(ValueError, match="k must be"):
        kmeans_1d(np.ones(3), 0)
