"""Reference models that train on the bundled 28×28 MNIST subset."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from penjing.models.lenet import LeNet5, LeNet300

MODELS: dict[str, Callable[..., nn.Module]] = {"lenet300": LeNet300, "lenet5": LeNet5}


def create(name: str, **kwargs) -> nn.Module:
    """A fresh model by name (one of MODELS)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "LeNet300", "LeNet5", "create"]
