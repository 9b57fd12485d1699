"""Calibration observers: watch activations, then say which range to quantize.

One interface: an observer is a callable that sees batches (`observer(x)`) and then gives
a range with `observer.range()` (min, max), scalars or one per channel. `qparams` turns
that range into a scale and zero point. Min/max and moving-average min/max work at any
granularity; percentile, entropy and MSE keep a histogram and are per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from penjing.quant.linear import PerChannel, PerTensor, QuantSpec, fake_quantize, qparams, reduce_range


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
        lo, hi = reduce_range(x.detach().float(), self.spec.granularity)
        self.update(x.detach().float(), lo, hi)
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


class Histogram(Observer):
    """Keeps a histogram of the values over a range that grows as batches arrive.

    When a batch falls outside the current range, the range widens (to a power-of-two
    multiple) and old counts are merged into the wider bins; the bin width only grows.
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
        self.edge_lo = self.edge_hi = 0.0

    def update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().update(x, lo, hi)
        new_lo, new_hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if self.batches == 0 or self.edge_hi == self.edge_lo:
            self.edge_lo, self.edge_hi = new_lo, new_hi
            if new_hi == new_lo:
                self.edge_hi = new_lo + 1e-8
        elif new_lo < self.edge_lo or new_hi > self.edge_hi:
            self._widen(new_lo, new_hi)
        self.counts += torch.histc(
            x.flatten().double(), self.bins, self.edge_lo, self.edge_hi
        )

    def _widen(self, new_lo: float, new_hi: float) -> None:
        old_centers = self.centers()
        self.edge_lo, self.edge_hi = min(new_lo, self.edge_lo), max(new_hi, self.edge_hi)
        step = (self.edge_hi - self.edge_lo) / self.bins
        index = ((old_centers - self.edge_lo) / step).long().clamp(0, self.bins - 1)
        self.counts = torch.zeros_like(self.counts).index_add_(0, index, self.counts)

    def centers(self) -> torch.Tensor:
        step = (self.edge_hi - self.edge_lo) / self.bins
        return self.edge_lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * step

    def clip(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The range [min, max] clipped to [-threshold, threshold]."""
        lo, hi = Observer.range(self)
        return lo.clamp_min(-threshold), hi.clamp_max(threshold)


class Percentile(Histogram):
    """Clip the range at the `percentile`-th percentile of |x| (99.99 by default)."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(spec, bins)
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = Observer.range(self)
        c, counts = self.centers(), self.counts
        cdf = torch.cumsum(counts, 0) / counts.sum()
        q = self.percentile / 100
        upper = float(c[int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=len(c) - 1))])
        lower = float(c[int(torch.searchsorted(cdf, torch.tensor(1 - q, dtype=cdf.dtype)).clamp(max=len(c) - 1))])
        step = (self.edge_hi - self.edge_lo) / self.bins
        return lo.clamp_min(min(lower - step / 2, 0.0)), hi.clamp_max(max(upper + step / 2, 0.0))


def _abs_histogram(obs: Histogram, bins: int) -> torch.Tensor:
    """Counts of |x| over [0, max|x|] in `bins` bins, from the signed histogram."""
    c = obs.centers().abs()
    top = float(c.max()) or 1e-8
    index = (c / top * bins).long().clamp(0, bins - 1)
    return torch.zeros(bins, dtype=torch.float64).index_add_(0, index, obs.counts), top


class Entropy(Histogram):
    """TensorRT-style calibration: the clipping threshold T whose quantized histogram
    has the least KL divergence from the observed one (Migacz, GTC 2017)."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, _ = Observer.range(self)
        hist, top = _abs_histogram(self, self.bins)
        # one-sided data (e.g. after ReLU) uses every level; two-sided data half of them
        levels = 2**self.spec.bits if float(lo) >= 0 or not self.spec.signed else 2 ** (self.spec.bits - 1)
        levels = min(levels, self.bins)
        best, best_i = math.inf, self.bins
        for i in range(levels, self.bins + 1, max(1, (self.bins - levels) // 128)):
            ref = hist[:i].clone()
            ref[i - 1] += hist[i:].sum()  # clipped mass goes to the last bin
            nonzero = hist[:i] > 0
            # merge i bins into `levels` chunks, spread each chunk back over its non-empty bins
            chunk = torch.arange(i) * levels // i
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, hist[:i])
            filled = torch.zeros(levels, dtype=torch.float64).index_add_(
                0, chunk, nonzero.double()
            )
            q = torch.where(nonzero, mass[chunk] / filled[chunk].clamp_min(1), 0.0)
            p = ref / ref.sum()
            q = q / q.sum()
            mask = p > 0
            kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())
            if kl < best:
                best, best_i = kl, i
        return self.clip(best_i / self.bins * top)


class MSE(Histogram):
    """The clipping range that minimises the expected squared quantization error,
    searched over 100 thresholds on the histogram."""

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


def make_observer(observer: str | Callable[[QuantSpec], Observer], spec: QuantSpec) -> Observer:
    """An observer by name (one of OBSERVERS) or from a callable `spec -> observer`."""
    if callable(observer):
        return observer(spec)
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[observer](spec)
