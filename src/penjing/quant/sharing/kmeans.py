"""Exact 1-D k-means (Lloyd) on sorted values: O(n log n) once, then O(k log n) per step.

In one dimension every cluster of a Lloyd step is a contiguous run of the sorted values,
bounded by the midpoints between neighbouring centroids. After one sort, a step is a
`searchsorted` of k − 1 midpoints plus prefix-sum differences for the means, so
iterations cost nothing next to the sort, and we can run Lloyd to convergence.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

INITS = ("linear", "density", "forgy")


@dataclass(frozen=True)
class KMeansResult:
    """Sorted centroids, each value's cluster label, and how the run went."""

    centroids: np.ndarray  # (k,) float64, ascending
    labels: np.ndarray  # (n,) int32 into centroids, in the order the values were given
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
        return np.linspace(float(sorted_values[0]), float(sorted_values[-1]), k)
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

    xs = np.sort(values)
    if np.count_nonzero(xs[1:] != xs[:-1]) < k:
        centroids = np.unique(xs).astype(np.float64)
        labels = np.searchsorted(centroids, values.astype(np.float64))
        return KMeansResult(centroids, labels.astype(np.int32), 0)

    # Prefix sums in float64 give every cluster's mean in O(1); the sorted values stay in
    # their own dtype (a float64 copy of 10 M values costs more than the whole search).
    prefix = np.empty(xs.size + 1)
    prefix[0] = 0.0
    np.cumsum(xs, dtype=np.float64, out=prefix[1:])
    mean = prefix[-1] / xs.size
    threshold = tol * max(_sum_of_squares(xs) / xs.size - mean * mean, 0.0)
    centroids = np.sort(initial_centroids(xs, k, init, seed).astype(np.float64))
    cuts = None
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported after the loop
        new_cuts = count_below(xs, (centroids[:-1] + centroids[1:]) / 2.0)
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

    # Nearest centroid = number of midpoints at or below the value; the midpoints are
    # rounded to the values' dtype, which can only flip a value within one ulp of a tie.
    labels = bucketize(values, ((centroids[:-1] + centroids[1:]) / 2.0).astype(values.dtype))
    return KMeansResult(centroids, labels, iterations)


def _sum_of_squares(xs: np.ndarray, chunk: int = 1 << 16) -> float:
    """sum(xs**2): each chunk's dot product in the values' dtype, chunks added in float64
    (no float64 copy of xs; a float32 sum over 10 M values would drift)."""
    return float(sum(float(np.dot(c, c)) for c in (
        xs[i:i + chunk] for i in range(0, xs.size, chunk))))


def count_below(sorted_values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """For each float64 point, how many of the sorted values lie strictly below it, exactly,
    whatever the values' dtype.

    Rounded to a float32 `sorted_values`, a point p becomes q. No float32 lies strictly
    between p and q, so x < p is x < q when q >= p, and x <= q when q < p.
    """
    if sorted_values.dtype == points.dtype:
        return np.searchsorted(sorted_values, points)
    q = points.astype(sorted_values.dtype)
    return np.where(q < points, np.searchsorted(sorted_values, q, side="right"),
                    np.searchsorted(sorted_values, q, side="left"))


_MAX_CELLS = 1 << 20


def bucketize(values: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """How many of the ascending `boundaries` are <= each value (int32), as
    `torch.bucketize(values, boundaries, right=True)` gives, in a few passes over the
    values instead of a binary search per value.

    A uniform grid of M cells spans the boundaries. A value's cell, computed in its own
    dtype, is off by at most one, so each cell keeps the count of boundaries below its
    left neighbour and the one boundary (if any) in it and its two neighbours: the label
    is that count plus one comparison. Boundaries too close together for such a grid go
    to torch's binary search instead.
    """
    n_bounds = boundaries.size
    if n_bounds == 0:
        return np.zeros(values.size, dtype=np.int32)
    lo, hi = float(boundaries[0]), float(boundaries[-1])
    gaps = np.diff(boundaries.astype(np.float64))
    cells = _MAX_CELLS + 1
    if hi > lo and np.all(gaps > 0):
        cells = max(1024, 4 * int(np.ceil((hi - lo) / gaps.min())))
    if cells > _MAX_CELLS:
        found = torch.bucketize(torch.from_numpy(values), torch.from_numpy(boundaries),
                                right=True)
        return found.numpy().astype(np.int32)
    width = (hi - lo) / cells
    # Cell c spans [lo + c*width, lo + (c+1)*width); cell -1 holds everything below lo and
    # cell `cells` everything from hi up. A value in computed cell c lies in c-1..c+1.
    c = np.arange(-1, cells + 1, dtype=np.float64)
    window_lo = np.where(c <= 0, -np.inf, lo + (c - 1) * width)
    window_hi = np.where(c >= cells - 1, np.inf, lo + (c + 2) * width)
    bounds = boundaries.astype(np.float64)
    below = np.searchsorted(bounds, window_lo, side="left")
    inside = np.searchsorted(bounds, window_hi, side="left") - below
    if inside.max() > 1:  # cannot happen with cells >= 4 (hi - lo) / min gap
        raise AssertionError("bucketize grid is too coarse")
    only = np.where(inside == 1, bounds[np.minimum(below, n_bounds - 1)], np.inf)
    # Tables indexed by cell + 1 are rolled so that cell -1 sits last: index -1.
    base = np.roll(below, -1).astype(np.int32)
    threshold = np.roll(only, -1).astype(values.dtype)
    lo_, scale = values.dtype.type(lo), values.dtype.type(cells / (hi - lo))

    def label(part: np.ndarray, out: np.ndarray) -> None:
        with np.errstate(over="ignore"):  # values far outside the grid: inf, then clipped
            cell = np.subtract(part, lo_)
            cell *= scale
        np.clip(cell, -1, cells, out=cell)
        index = cell.astype(np.int32)
        np.take(base, index, out=out)
        out += part >= np.take(threshold, index)

    labels = np.empty(values.size, dtype=np.int32)
    _in_parallel(label, values, labels)
    return labels


def _in_parallel(fn, values: np.ndarray, out: np.ndarray, chunk: int = 1 << 20) -> None:
    """fn(values[a:b], out[a:b]) over chunks, on torch's thread count (numpy releases the
    GIL inside each call)."""
    spans = [(a, min(a + chunk, values.size)) for a in range(0, values.size, chunk)]
    workers = min(torch.get_num_threads(), len(spans))
    if workers <= 1:
        for a, b in spans:
            fn(values[a:b], out[a:b])
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda span: fn(values[span[0]:span[1]], out[span[0]:span[1]]), spans))
