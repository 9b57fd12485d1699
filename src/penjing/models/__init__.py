"""Reference models that train on the bundled 28×28 MNIST subset."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from penjing.models.lenet import LeNet5, LeNet300
from penjing.models.mobilenet import MobileNetV2
from penjing.models.resnet import ResNet, resnet20, resnet56
from penjing.models.students import MLP, ThinLeNet5
from penjing.models.vgg import SmallVGG

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "vgg": SmallVGG,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenetv2": MobileNetV2,
    "mlp30": MLP,
    "lenet5_thin": ThinLeNet5,
}


def create(name: str, **kwargs) -> nn.Module:
    """A fresh model by name (one of MODELS)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = [
    "MODELS",
    "LeNet300",
    "LeNet5",
    "MLP",
    "MobileNetV2",
    "ResNet",
    "SmallVGG",
    "ThinLeNet5",
    "create",
    "resnet20",
    "resnet56",
]
