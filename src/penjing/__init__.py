"""penjing: make trained PyTorch networks smaller and faster without losing accuracy.

The subpackages import on first use (`pj.prune`, `pj.quant`, ...), so `import penjing`
and `penjing -h` do not wait for PyTorch to load."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("analysis", "codec", "data", "distill", "distributed", "errors", "export",
                "layers", "models", "prune", "quant", "train")
_FUNCTIONS = {"load": "penjing.core.model_file", "save": "penjing.core.model_file",
              "finalize_": "penjing.core.parametrize"}

__all__ = sorted([*_SUBPACKAGES, *_FUNCTIONS])


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"penjing.{name}")
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'penjing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
