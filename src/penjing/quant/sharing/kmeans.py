"""Exact 1-D k-means (Lloyd) on sorted values: O(n log n) once, then O(k log n) per step.

In one dimension every cluster of a Lloyd step is a contiguous run of the sorted values,
bounded by the midpoints between neighbouring centroids. After one sort, a step is a
`searchsorted` of k − 1 midpoints plus prefix-sum differences for the means, so
iterations cost nothing next to the sort, and we can run Lloyd to convergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INITS = ("linear", "density", "forgy")


@dataclass(frozen=True)
class KMeansResult:
    """Sorted centroids, each value's cluster label, and how the run went."""

    centroids: np.ndarray  # (k,) float64, ascending
    labels: np.ndarray  # (n,) int64 into centroids, in the order the values were given
    iterations: int


def check_bits(bits: int, what: str = "bits") -> int:
    """`bits` as an int, or a ValueError when it is outside 1..16."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise TypeError(f"{what} must be an integer in 1..16, got {bits!r}")
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"{what} must be in 1..16, got {bits}")
    return int(bits)


def initial_centroids(
    sorted_values: np.ndarray, k: int, init: str = "linear", seed: int = 0
) -> np.ndarray:
    """Starting centroids, Deep Compression's three ways.

    - 'linear': evenly spaced between the smallest and largest value; keeps a few
      centroids on the rare large weights, which matter most (the paper's best).
    - 'density': evenly spaced on the CDF's y-axis, i.e. quantiles; dense near zero.
    - 'forgy': k values drawn at random from the data.
    """
    n = sorted_values.size
    if init == "linear":
        return np.linspace(sorted_values[0], sorted_values[-1], k)
    if init == "density":
        return sorted_values[((np.arange(k) + 0.5) / k * n).astype(np.int64).clip(0, n - 1)]
    if init == "forgy":
        rng = np.random.default_rng(seed)
        return np.sort(sorted_values[rng.choice(n, size=k, replace=False)])
    raise ValueError(f"unknown k-means init {init!r}; choose one of {INITS}")


def kmeans_1d(
    values: np.ndarray | torch.Tensor,
    k: int,
    *,
    init: str = "linear",
    max_iter: int = 3000,
    tol: float = 1e-7,
    seed: int = 0,
) -> KMeansResult:
    """Cluster 1-D `values` into at most `k` clusters with Lloyd's algorithm.

    Lloyd stops when the assignment no longer changes, or when the centroids moved by
    less than `tol` × the variance of the values in a step (squared shift summed over
    centroids, as scikit-learn's `tol`, whose default of 1e-4 is far looser).

    When the values hold no more than k distinct numbers, each distinct number is its own
    centroid (so the result is exact). Empty clusters keep their centroid.

    >>> r = kmeans_1d(weights.flatten(), k=32, init="linear")
    >>> shared = r.centroids[r.labels]
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values).ravel()
    if values.size == 0:
        raise ValueError("k-means needs at least one value, got an empty array")
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("k-means got NaN or infinite values; check the weights")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; choose one of {INITS}")

    # float64 once: searchsorted would otherwise cast the whole array at every step.
    xs = np.sort(values).astype(np.float64, copy=False)
    is_new = np.concatenate(([True], xs[1:] != xs[:-1]))
    if np.count_nonzero(is_new) <= k:
        centroids = xs[is_new].astype(np.float64)
        labels = np.searchsorted(centroids, values.astype(np.float64))
        return KMeansResult(centroids, labels.astype(np.int64), 0)

    prefix = np.concatenate(([0.0], np.cumsum(xs)))
    mean = prefix[-1] / xs.size
    threshold = tol * max(float(np.dot(xs, xs)) / xs.size - mean * mean, 0.0)
    centroids = np.sort(initial_centroids(xs, k, init, seed).astype(np.float64))
    cuts = None
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported after the loop
        new_cuts = np.searchsorted(xs, (centroids[:-1] + centroids[1:]) / 2.0)
        if cuts is not None and np.array_equal(new_cuts, cuts):
            break
        cuts = new_cuts
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [xs.size]))
        counts = ends - starts
        filled = counts > 0
        means = centroids.copy()
        means[filled] = (prefix[ends[filled]] - prefix[starts[filled]]) / counts[filled]
        means.sort()
        shift = float(np.sum((means - centroids) ** 2))
        centroids = means
        if shift <= threshold:
            break

    # Nearest centroid = number of midpoints at or below the value. torch's bucketize is
    # several times faster than numpy's searchsorted on unsorted values; the midpoints are
    # rounded to the values' dtype, which can only flip a value within one ulp of a tie.
    boundaries = torch.from_numpy((centroids[:-1] + centroids[1:]) / 2.0)
    values_t = torch.from_numpy(np.ascontiguousarray(values))
    labels = torch.bucketize(values_t, boundaries.to(values_t.dtype), right=True)
    return KMeansResult(centroids, labels.numpy().astype(np.int64, copy=False), iterations)
