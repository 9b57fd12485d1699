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


def _float32_grids():
    rng = np.random.default_rng(2)
    # A normal spread; values far from zero in a narrow range; a few clusters with gaps
    # of one ulp; heavy tails far beyond the boundaries.
    yield rng.normal(0, 0.05, 50_000).astype(np.float32), np.float32
    yield (1000 + rng.random(50_000) * 1e-2).astype(np.float32), np.float32
    yield np.repeat(np.float32([-1, 0, 1e-7, 1]), 1000) + np.float32(0), np.float32
    yield rng.standard_cauchy(50_000), np.float64


@pytest.mark.parametrize("k", [2, 7, 256])
@pytest.mark.parametrize("case", range(4))
def test_table_bucketize_equals_binary_search(case, k):
    import torch

    from penjing.quant.sharing.kmeans import bucketize

    values, dtype = list(_float32_grids())[case]
    rng = np.random.default_rng(k)
    # boundaries drawn from the values themselves (ties), plus their float neighbours
    picks = np.sort(rng.choice(values, size=k, replace=False)).astype(dtype)
    picks[1::3] = np.nextafter(picks[1::3], np.inf, dtype=dtype)
    bounds = np.unique(picks)
    probe = np.concatenate([values, bounds, np.nextafter(bounds, -np.inf, dtype=dtype),
                            np.array([-np.finfo(dtype).max, np.finfo(dtype).max], dtype)])
    expected = torch.bucketize(torch.from_numpy(probe), torch.from_numpy(bounds), right=True)
    got = bucketize(probe, bounds)
    assert got.dtype == np.int32
    assert np.array_equal(got, expected.numpy())


def test_cuts_on_float32_values_are_those_of_float64():
    from penjing.quant.sharing.kmeans import count_below

    rng = np.random.default_rng(3)
    xs = np.sort(rng.normal(0, 1, 100_000).astype(np.float32))
    # points between float32 neighbours, on them, and rounding up or down to float32
    points = np.concatenate([xs[::997].astype(np.float64) + d
                             for d in (0.0, 1e-12, -1e-12, 3e-8, -3e-8)])
    assert np.array_equal(count_below(xs, points),
                          np.searchsorted(xs.astype(np.float64), points))


def test_labels_are_int32_and_index_torch_tensors():
    import torch

    values = np.random.default_rng(4).normal(size=3_000_000).astype(np.float32)
    result = kmeans_1d(values, 16, max_iter=20)
    assert result.labels.dtype == np.int32
    shared = torch.from_numpy(result.centroids)[torch.from_numpy(result.labels)]
    nearest = np.abs(values[:1000, None] - result.centroids[None, :]).argmin(axis=1)
    assert np.array_equal(result.labels[:1000], nearest)
    assert shared.shape == (values.size,)
