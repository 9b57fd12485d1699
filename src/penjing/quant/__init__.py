"""Quantization: k-means weight sharing and trained quantization."""

from __future__ import annotations

from penjing.quant.kmeans import INITS, KMeansResult, check_bits, kmeans_1d
from penjing.quant.shared import SharedWeights, SharingInfo, get_shared, kmeans_

__all__ = [
    "INITS",
    "KMeansResult",
    "SharedWeights",
    "SharingInfo",
    "check_bits",
    "get_shared",
    "kmeans_",
    "kmeans_1d",
]
