"""Calibration observers: watch activations, then say which range to quantize.

One interface: an observer is a callable that sees batches (`observer(x)`) and then gives
a range with `observer.range()` (min, max), scalars or one per channel. `qparams` turns
that range into a scale and zero point. Min/max and moving-average min/max work at any
granularity; percentile, entropy and MSE keep a histogram and are per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from penjing.distributed import all_reduce
from penjing.quant.linear.primitives import (
    PerChannel,
    PerTensor,
    QuantSpec,
    fake_quantize,
    qparams,
    reduce_range,
)


class Observer:
    """Base: remembers the running min and max of everything it has seen."""

    def __init__(self, spec: QuantSpec) -> None:
        if not isinstance(spec.granularity, PerTensor | PerChannel):
            raise ValueError(
                f"activation observers work per tensor or per channel, got {spec.granularity!r}"
            )
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.update(x, *reduce_range(x, self.spec.granularity))
        self.batches += 1

    def update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batches == 0:
            raise ValueError(
                "the observer has seen no data: calibrate with at least one batch "
                "(an empty calibration loader?)"
            )
        return self.lo, self.hi

    def all_reduce_(self) -> None:
        """Merge what every torchrun rank saw (min of minima, max of maxima), so that all
        ranks freeze the same range; a no-op in one process."""
        if self.lo is not None:
            self.lo, self.hi = all_reduce(self.lo, "min"), all_reduce(self.hi, "max")
        self.batches = int(all_reduce(self.batches, "sum"))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*self.range(), self.spec)


class MinMax(Observer):
    """The full range seen: never clips, but one outlier spends the whole range."""


class MovingAverage(Observer):
    """Exponential moving average of each batch's min and max (PyTorch's QAT default)."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.1) -> None:
        super().__init__(spec)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        self.lo = self.lo + self.momentum * (lo - self.lo)
        self.hi = self.hi + self.momentum * (hi - self.hi)

    def all_reduce_(self) -> None:
        """Average every rank's moving minimum and maximum."""
        if self.lo is not None:
            self.lo, self.hi = all_reduce(self.lo, "mean"), all_reduce(self.hi, "mean")
        self.batches = int(all_reduce(self.batches, "sum"))


class Histogram(Observer):
    """Keeps a histogram of the non-zero values over a range that grows as batches arrive.

    Exact zeros (ReLU outputs, padding) are counted apart: every range `qparams` makes
    holds zero exactly, so they cost nothing at any clipping threshold and would only
    drown the bin around 0. When a batch falls outside the current range, the range
    widens to cover it and the old counts move to the wider bin that holds each old
    bin's centre; bins only grow.
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048) -> None:
        if not isinstance(spec.granularity, PerTensor):
            raise ValueError(
                f"{type(self).__name__} observers work per tensor, got {spec.granularity!r}; "
                "use 'minmax' or 'moving_average' per channel"
            )
        super().__init__(spec)
        if bins < 16:
            raise ValueError(f"bins must be >= 16, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.zeros = 0
        self.edge_lo = self.edge_hi = 0.0

    def update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().update(x, lo, hi)
        new_lo, new_hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if self.batches == 0:
            self.edge_lo, self.edge_hi = new_lo, new_hi
            if new_hi == new_lo:
                self.edge_hi = new_lo + 1e-8
        elif new_lo < self.edge_lo or new_hi > self.edge_hi:
            self._widen(new_lo, new_hi)
        values = x.flatten().double()
        nonzero = values[values != 0]
        self.zeros += values.numel() - nonzero.numel()
        self.counts += torch.histc(nonzero, self.bins, self.edge_lo, self.edge_hi)

    def all_reduce_(self) -> None:
        """Merge every rank's histogram: each widens to the common range, then the
        counts add up."""
        super().all_reduce_()
        edge_lo, edge_hi = all_reduce(self.edge_lo, "min"), all_reduce(self.edge_hi, "max")
        if (edge_lo, edge_hi) != (self.edge_lo, self.edge_hi):
            self._widen(edge_lo, edge_hi)
        self.counts = all_reduce(self.counts, "sum")
        self.zeros = int(all_reduce(self.zeros, "sum"))

    def _widen(self, new_lo: float, new_hi: float) -> None:
        old_centers = self.centers()
        self.edge_lo, self.edge_hi = min(new_lo, self.edge_lo), max(new_hi, self.edge_hi)
        index = ((old_centers - self.edge_lo) / self.width).long().clamp(0, self.bins - 1)
        self.counts = torch.zeros_like(self.counts).index_add_(0, index, self.counts)

    @property
    def width(self) -> float:
        """The width of one bin."""
        return (self.edge_hi - self.edge_lo) / self.bins

    def centers(self) -> torch.Tensor:
        return self.edge_lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width

    def clip(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The range [min, max] clipped to [-threshold, threshold]."""
        lo, hi = Observer.range(self)
        return lo.clamp_min(-threshold), hi.clamp_max(threshold)


class Percentile(Histogram):
    """Clip the top of the range at the `percentile`-th percentile of x and the bottom at
    the (100 − percentile)-th (99.99 by default): a few outliers no longer set the scale."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(spec, bins)
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = Observer.range(self)
        c, counts = self.centers(), self.counts.clone()
        zero_bin = min(int(-self.edge_lo / self.width), self.bins - 1)
        counts[zero_bin] += self.zeros  # zeros are part of the distribution here
        cdf = torch.cumsum(counts, 0) / counts.sum()
        q = torch.tensor([self.percentile / 100, 1 - self.percentile / 100], dtype=cdf.dtype)
        upper, lower = (float(v) for v in c[torch.searchsorted(cdf, q).clamp(max=len(c) - 1)])
        half = self.width / 2
        return lo.clamp_min(min(lower - half, 0.0)), hi.clamp_max(max(upper + half, 0.0))


def _kl_divergence(hist: np.ndarray, start: int, stop: int, levels: int) -> float:
    """KL(p ‖ q) for clipping `hist` to bins [start, stop) and quantizing them to `levels`.

    p: the clipped histogram, the mass outside moved into its end bins. q: the kept bins
    merged into `levels` equal chunks, each chunk's mass spread back evenly over its
    non-empty bins — what the quantized tensor can still tell apart. (numpy: this runs
    128 times per quantizer on short arrays, where torch's per-op overhead dominates.)
    """
    kept = hist[start:stop]
    p = kept.copy()
    p[0] += hist[:start].sum()
    p[-1] += hist[stop:].sum()
    nonzero = kept > 0
    chunk = np.arange(len(kept)) * levels // len(kept)
    mass = np.bincount(chunk, weights=kept, minlength=levels)
    filled = np.bincount(chunk, weights=nonzero, minlength=levels)
    q = np.where(nonzero, mass[chunk] / np.maximum(filled[chunk], 1), 0.0)
    if q.sum() == 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))).sum())


class Entropy(Histogram):
    """TensorRT-style calibration: the clipping threshold T whose quantized histogram
    has the least KL divergence from the observed one (Migacz, GTC 2017).

    The window [max(min, −T), min(max, T)] is cut from the signed histogram and spread
    over all 2^bits levels, as the quantizer will (an asymmetric range keeps a one-sided
    minimum such as a ReLU's 0 or an image's background). The histogram has 16 bins per
    level over the full range (4,096 at 8 bits), TensorRT's 2,048 bins for 128 levels.
    T runs over 128 steps up to the full range, from the narrowest window that clips at
    most `max_clipped` of the non-zero values (0.1 %). TensorRT starts at a fixed 1/16 of
    the range instead; but KL only sees how much mass is clipped, not how far it moves,
    and it charges every spike (one value repeated, e.g. a constant image background
    convolved: one value per channel) for sharing a level with its neighbours, so on
    digit images it would rather clip a fifth of a layer's outputs than widen the range.
    """

    def __init__(
        self, spec: QuantSpec, bins: int | None = None, max_clipped: float = 0.001
    ) -> None:
        super().__init__(spec, bins or min(max(16 * 2**spec.bits, 2048), 16384))
        if not 0 <= max_clipped < 1:
            raise ValueError(f"max_clipped must be in [0, 1), got {max_clipped}")
        self.max_clipped = max_clipped

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = (float(v) for v in Observer.range(self))
        levels = min(2**self.spec.bits, self.bins // 16)
        top = max(-lo, hi)
        counts = self.counts.numpy()
        total = counts.sum()
        if not total or top <= 0:
            return self.clip(top)
        below, above = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]
        best, best_t = math.inf, top
        for t in np.linspace(min(levels * self.width, top), top, 128):
            start = max(0, math.floor((max(lo, -t) - self.edge_lo) / self.width))
            stop = min(self.bins, math.ceil((min(hi, t) - self.edge_lo) / self.width))
            clipped = (below[start - 1] if start else 0) + (above[stop] if stop < self.bins else 0)
            if stop - start < levels or clipped > self.max_clipped * total:
                continue
            kl = _kl_divergence(counts, start, stop, levels)
            if kl < best:
                best, best_t = kl, float(t)
        return self.clip(best_t)


class MSE(Histogram):
    """The clipping range that minimises the expected squared quantization error,
    searched over 100 thresholds on the histogram (exact zeros cost nothing anywhere)."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = Observer.range(self)
        c = self.centers().float()
        counts = self.counts.float()
        top = float(torch.maximum(-lo, hi))
        best, best_range = math.inf, (lo, hi)
        for k in range(1, 101):
            cand = self.clip(top * k / 100)
            scale, zero = qparams(*cand, self.spec)
            err = float((counts * (c - fake_quantize(c, scale, zero, self.spec)).square()).sum())
            if err < best:
                best, best_range = err, cand
        return best_range


OBSERVERS: dict[str, Callable[[QuantSpec], Observer]] = {
    "minmax": MinMax,
    "moving_average": MovingAverage,
    "percentile": Percentile,
    "entropy": Entropy,
    "mse": MSE,
}


def make_observer(
    observer: str | Callable[[QuantSpec], Observer], spec: QuantSpec
) -> Observer:
    """An observer by name (one of OBSERVERS) or from a callable `spec -> observer`."""
    if callable(observer):
        return observer(spec)
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[observer](spec)
