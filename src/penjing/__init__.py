"""penjing: make trained PyTorch networks smaller and faster without losing accuracy."""

from __future__ import annotations

from penjing import codec, data, errors, models, prune, quant, train
from penjing.prune.masks import finalize_

__version__ = "0.1.0"

__all__ = ["codec", "data", "errors", "finalize_", "models", "prune", "quant", "train"]
