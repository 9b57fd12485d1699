"""Bundled data sets: no downloads, the same split on every machine."""

from __future__ import annotations

from penjing.data.bundled import DATASETS, DataSplit, digits, load, loaders, mnist

__all__ = ["DATASETS", "DataSplit", "digits", "load", "loaders", "mnist"]
