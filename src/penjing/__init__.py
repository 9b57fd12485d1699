"""penjing: make trained PyTorch networks smaller and faster without losing accuracy."""

from __future__ import annotations

from penjing import (
    analysis,
    codec,
    data,
    distill,
    distributed,
    errors,
    export,
    layers,
    models,
    prune,
    quant,
    train,
)
from penjing.core.model_file import load, save
from penjing.core.parametrize import finalize_

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "codec",
    "data",
    "distill",
    "distributed",
    "errors",
    "export",
    "finalize_",
    "layers",
    "load",
    "models",
    "prune",
    "quant",
    "save",
    "train",
]
