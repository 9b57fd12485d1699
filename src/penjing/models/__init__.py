"""Reference models that train on the bundled 28×28 MNIST subset."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from penjing.models.encoder import TinyEncoder
from penjing.models.lenet import LeNet5, LeNet300
from penjing.models.mobilenet import MobileNetV2
from penjing.models.resnet import ResNet, resnet20, resnet56
from penjing.models.students import MLP, ThinLeNet5
from penjing.models.vgg import SmallVGG
from penjing.spec import import_object

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "vgg": SmallVGG,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenetv2": MobileNetV2,
    "mlp30": MLP,
    "lenet5_thin": ThinLeNet5,
    "encoder": TinyEncoder,
}


def create(name: str, **kwargs) -> nn.Module:
    """A fresh model by name (one of MODELS)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def build(spec: str, num_classes: int | None = None, role: str = "model") -> nn.Module:
    """A fresh model from a name in MODELS or from 'package.module:function'.

    A penjing model is made with `num_classes` outputs when given; a user's function is
    called with no arguments and fixes its own. `role` names the model in errors.
    """
    if ":" not in spec:
        if spec not in MODELS:
            raise ValueError(
                f"unknown {role} {spec!r}; give one of {sorted(MODELS)} or your own as "
                "'package.module:function' (a function of no arguments returning an nn.Module)"
            )
        return create(spec) if num_classes is None else create(spec, num_classes=num_classes)

    factory = import_object(spec, role)
    if not callable(factory):
        raise TypeError(f"{role} {spec!r} must name a function, got {type(factory).__name__}")
    try:
        model = factory()
    except Exception as err:  # the user's code: say whose it is, in one line
        raise ValueError(f"{role} {spec!r} raised {type(err).__name__}: {err}; fix the function "
                         "or give another") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"{role} {spec!r} must give an nn.Module, got {type(model).__name__}")
    return model


__all__ = [
    "MODELS",
    "LeNet300",
    "LeNet5",
    "MLP",
    "MobileNetV2",
    "ResNet",
    "SmallVGG",
    "ThinLeNet5",
    "TinyEncoder",
    "build",
    "create",
    "resnet20",
    "resnet56",
]
