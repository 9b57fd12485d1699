"""Binary weight masks held as parametrizations, so a masked model is still a plain nn.Module.

The mask multiplies the weight in forward; autograd then gives every pruned weight a zero
gradient, so fine-tuning with any optimizer keeps pruned weights exactly zero. The stored
weight is zeroed as well, which keeps `parametrizations.weight.original` honest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.errors import UnsupportedLayerError

# Layers whose `weight` element pruning and weight sharing handle.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# embedding tables: pruned or shared only when named (a model's table is often tied to its
# output layer, and a sweep over "every layer" should not change the vocabulary silently)
LOOKUPS = (nn.Embedding,)


class Mask(nn.Module):
    """Parametrization `weight -> weight * mask` with a fixed 0/1 mask buffer."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def select_layers(
    model: nn.Module, layers: list[str] | Callable[[nn.Module, str], bool] | None = None
) -> dict[str, nn.Module]:
    """The layers to act on, by fully qualified name: `layers` (names, or a filter
    `fn(module, name)` such as `penjing.layers.types(nn.Linear)` applied to the prunable
    layers), or every prunable layer.

    A name that does not exist, or names a layer type we cannot handle, is an error that
    lists what would work; so is a filter that accepts no prunable layer.
    """
    modules = dict(model.named_modules())
    if callable(layers):
        found = {n: m for n, m in modules.items() if isinstance(m, PRUNABLE) and layers(m, n)}
        if not found:
            prunable = sorted(n for n, m in modules.items() if isinstance(m, PRUNABLE))
            raise ValueError(f"the layer filter {layers!r} accepts none of the prunable "
                             f"layers {prunable[:8]}")
        return found
    if layers is None:
        found = {name: m for name, m in modules.items() if isinstance(m, PRUNABLE)}
        if not found:
            raise UnsupportedLayerError(
                f"{type(model).__name__} has no Linear or Conv layer to prune or share"
            )
        return found
    chosen = {}
    prunable = sorted(n for n, m in modules.items() if isinstance(m, PRUNABLE))
    for name in layers:
        if name not in modules:
            raise ValueError(f"no layer named {name!r} in the model; prunable layers: {prunable}")
        module = modules[name]
        if not isinstance(module, PRUNABLE + LOOKUPS):
            raise UnsupportedLayerError(
                f"layer {name!r} is a {type(module).__name__}, which weight pruning and sharing "
                f"cannot handle; supported: Linear, Conv1d/2d/3d, and nn.Embedding when named, "
                f"e.g. {prunable[:5]}"
            )
        chosen[name] = module
    return chosen


def own_class_(module: nn.Module) -> nn.Module:
    """Give a parametrized `module` a class of its own before its parametrizations change.

    torch makes one class per parametrized module and `copy.deepcopy` shares it with the
    copy, so removing (or adding) a parametrization on a copy would delete (or add) the
    property on the original's class too and break the original.
    """
    if parametrize.is_parametrized(module):
        cls = type(module)
        attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, attrs)
    return module


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The mask on `module.weight`, or None when the weight is not masked."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, Mask):
            return p.mask
    return None


def set_mask_(module: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Mask `module.weight` with `mask` (replacing an earlier mask) and zero the pruned weights."""
    weight = module.weight
    if mask.shape != weight.shape:
        raise ValueError(
            f"a mask must have the weight's shape {tuple(weight.shape)}, got "
            f"{tuple(mask.shape)}; build it from module.weight (e.g. module.weight != 0)"
        )
    mask = mask.to(dtype=weight.dtype, device=weight.device)
    existing = get_mask(module)
    if existing is not None:
        existing.copy_(mask)
        module.parametrizations.weight.original.data.mul_(mask)
        return module
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(
            f"{type(module).__name__}.weight already carries a parametrization that is not a "
            "mask (e.g. shared weights); prune before weight sharing or finalize_ first"
        )
    with torch.no_grad():
        weight.mul_(mask)
    parametrize.register_parametrization(own_class_(module), "weight", Mask(mask))
    return module


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight mask in `model`, by layer name."""
    found = {}
    for name, module in model.named_modules():
        mask = get_mask(module)
        if mask is not None:
            found[name] = mask
    return found


def finalize_(model: nn.Module) -> list[str]:
    """Bake every parametrization into a plain weight (for export, saving, benchmarks).

    Returns the names of the layers that changed.
    """
    changed = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(own_class_(module), tensor_name,
                                                    leave_parametrized=True)
            changed.append(name)
    return changed
