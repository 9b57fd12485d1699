"""How sure an accuracy figure is: 95 % intervals of one accuracy and of the change
between two models measured on the same test images, and the verdict a target gets.

On 1,000 test images an accuracy near 93 % is known to about ±1.6 points, so "within
half a point of the original" cannot be read off two such figures. The change between
two models on the same images is known much better than either accuracy, because most
images are right (or wrong) for both; only the images they disagree on carry noise.

- `wilson(k, n)`: the Wilson score interval of a proportion (Wilson, 1927), which keeps
  its coverage near 0 % and 100 %, where the textbook p ± z·se does not.
- `paired_difference(a, b)`: the interval of accuracy(b) − accuracy(a) from per-image
  correctness, by Newcombe's (1998) method 10: Wilson intervals of the two accuracies,
  combined with the correlation of the pairs.
- `verdict(interval, at_most=..., at_least=...)`: "met" only when the whole interval is
  on the right side of the limit, "missed" when it is wholly on the wrong side, and
  "within noise" otherwise.

    >>> base, small = correct(model, test), correct(compressed, test)
    >>> print(accuracy_interval(small).format(), paired_difference(base, small).format())
    >>> verdict(paired_difference(base, small).negated(), at_most=0.01)  # drop <= 1 point
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from penjing.core.modes import eval_mode

VERDICTS = ("met", "missed", "within noise")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Interval:
    """A figure and its interval: accuracy (a fraction), or a change of accuracy."""

    value: float
    low: float
    high: float
    n: int  # test images it was measured on
    confidence: float = 0.95

    def __contains__(self, x: float) -> bool:
        return self.low <= x <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def negated(self) -> Interval:
        """The same interval for the opposite sign: a change turned into a drop."""
        return Interval(-self.value, -self.high, -self.low, self.n, self.confidence)

    def format(self, points: bool = False) -> str:
        """'93.60 % [92.04, 94.93]', or with `points` a change: '-0.40 [-1.10, +0.29] points'."""
        if points:
            return (f"{100 * self.value:+.2f} [{100 * self.low:+.2f}, {100 * self.high:+.2f}] "
                    "points")
        return f"{100 * self.value:.2f} % [{100 * self.low:.2f}, {100 * self.high:.2f}]"

    def __str__(self) -> str:
        return self.format()


def _counts(correct) -> np.ndarray:
    array = np.asarray(correct.cpu() if isinstance(correct, torch.Tensor) else correct)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"per-image correctness must be a non-empty 1-D array of booleans, "
                         f"got shape {array.shape}")
    if array.dtype != np.bool_ and not np.isin(array, (0, 1)).all():
        raise ValueError("per-image correctness must hold only True/False (or 1/0)")
    return array.astype(bool)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of `successes` out of `n`."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), int(n), confidence)


def accuracy_interval(correct, confidence: float = 0.95) -> Interval:
    """Accuracy and its Wilson interval from per-image correctness (booleans)."""
    hits = _counts(correct)
    return wilson(int(hits.sum()), hits.size, confidence)


def paired_difference(before, after, confidence: float = 0.95) -> Interval:
    """accuracy(after) − accuracy(before) and its interval, both measured on the same
    images in the same order (per-image correctness of each), by Newcombe's method 10."""
    a, b = _counts(before), _counts(after)
    if a.size != b.size:
        raise ValueError(f"the two models must be measured on the same images; got "
                         f"{a.size} and {b.size} results")
    n = a.size
    both, only_a = int((a & b).sum()), int((a & ~b).sum())
    only_b, neither = int((~a & b).sum()), int((~a & ~b).sum())
    wa, wb = wilson(both + only_a, n, confidence), wilson(both + only_b, n, confidence)
    (pa, la, ua), (pb, lb, ub) = (wa.value, wa.low, wa.high), (wb.value, wb.low, wb.high)
    denominator = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0 if denominator == 0 else (both * neither - only_a * only_b) / math.sqrt(denominator)
    change = pb - pa
    below = math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    above = math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return Interval(change, max(-1.0, change - below), min(1.0, change + above), n, confidence)


def verdict(interval: Interval, *, at_most: float | None = None,
            at_least: float | None = None) -> str:
    """'met' when the whole interval keeps the limit, 'missed' when none of it does,
    'within noise' when the limit falls inside it. Give exactly one limit."""
    if (at_most is None) == (at_least is None):
        raise ValueError("give exactly one of at_most= and at_least=")
    if at_most is not None:
        return ("met" if interval.high <= at_most else
                "missed" if interval.low > at_most else "within noise")
    return ("met" if interval.low >= at_least else
            "missed" if interval.high < at_least else "within noise")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (sd 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@torch.no_grad()
def correct(model: nn.Module, loader: Iterable) -> torch.Tensor:
    """Per-image correctness (bool, in the loader's order) of `model`'s top-1 class on
    (inputs, labels) batches: what the intervals above are computed from."""
    hits = []
    with eval_mode(model):
        for batch in loader:
            if not isinstance(batch, list | tuple) or len(batch) != 2:
                raise TypeError("correct() takes a loader of (inputs, labels) batches, got a "
                                f"batch of type {type(batch).__name__}")
            x, y = batch
            hits.append(model(x).argmax(-1) == y)
    if not hits:
        raise ValueError("the loader gave no batches; pass a loader over the test images")
    return torch.cat(hits)
