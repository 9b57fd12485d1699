"""Bundled and packaged data sets: no downloads, the same split on every machine."""

from __future__ import annotations

from penjing.data.bundled import DATASETS, DataSplit, digits, load, loaders, mnist
from penjing.data.fashion import fashion_mnist
from penjing.data.text import Perplexity, lm_windows, perplexity, perplexity_ratio, wiki_articles

__all__ = [
    "DATASETS", "DataSplit", "Perplexity", "digits", "fashion_mnist", "lm_windows", "load",
    "loaders", "mnist", "perplexity", "perplexity_ratio", "wiki_articles",
]
