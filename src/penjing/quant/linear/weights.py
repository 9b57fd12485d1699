"""Fake quantizers put on the weights of chosen layers: the part of quantization that
traced (penjing.quant.linear.ptq) and eager (penjing.quant.linear.eager) models share."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from penjing.core.parametrize import own_class_
from penjing.quant.linear.config import QuantConfig
from penjing.quant.linear.fakequant import WeightQuant, get_weight_quant, weight_tensors
from penjing.quant.linear.primitives import QuantSpec
from penjing.quant.sharing.shared import get_shared


def quantize_weights_(
    model: nn.Module, chosen: dict[str, QuantSpec | None], config: QuantConfig, qat: bool
) -> dict[str, WeightQuant]:
    """Fake quantizers on the weights of the layers `select` chose (spec None: left
    float), in place; returns them by weight name. A weight already quantized or shared
    is an error: finalize_ it first."""
    modules = dict(model.named_modules())
    added = {}
    for name, spec in chosen.items():
        if spec is None:
            continue
        for path, tensor in weight_tensors(modules[name]):
            owner = modules[name].get_submodule(path)
            key = ".".join(p for p in (name, path) if p)
            key += "" if tensor == "weight" else f".{tensor}"
            if get_weight_quant(owner, tensor) is not None or get_shared(owner) is not None:
                raise ValueError(
                    f"layer {key!r} already has quantized or shared weights; finalize_ it first"
                )
            try:
                quant = WeightQuant(getattr(owner, tensor), spec, config.weight_range,
                                    config.learnable, qat)
            except ValueError as err:
                raise ValueError(f"layer {key!r}: {err}") from err
            parametrize.register_parametrization(own_class_(owner), tensor, quant)
            added[key] = quant
    return added
