"""The parametrizations every method shares, so a masked or shared model is still a plain
nn.Module: binary weight masks (pruning), shared-weight tables (k-means sharing), how
layers are chosen for them, and `finalize_`, which bakes them in.

A mask multiplies the weight in forward; autograd then gives every pruned weight a zero
gradient, so fine-tuning with any optimizer keeps pruned weights exactly zero. The stored
weight is zeroed as well, which keeps `parametrizations.weight.original` honest.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.core.steps import Step
from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.hf import is_conv1d

# Layers whose `weight` element pruning and weight sharing handle.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Conv1DMeta(type):
    def __instancecheck__(cls, module) -> bool:
        return is_conv1d(module)


class HFConv1D(metaclass=_Conv1DMeta):
    """Stands for transformers' Conv1D in isinstance checks, without importing transformers."""

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


class SharedWeights(nn.Module):
    """Parametrization `weight -> [0, *centroids][codes]`; the original weight is not used."""

    def __init__(self, centroids: torch.Tensor, codes: torch.Tensor) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("codes", codes)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.centroids.new_zeros(1), self.centroids])
        # an embedding lookup, not table[codes]: the backward of indexing sums a cluster's
        # gradients in an order that varies between runs on several threads
        return nn.functional.embedding(self.codes, table[:, None]).squeeze(-1).to(weight.dtype)


def select_layers(
    model: nn.Module, layers: list[str] | Callable[[nn.Module, str], bool] | None = None,
    *, conv1d: bool = False
) -> dict[str, nn.Module]:
    """The layers to act on, by fully qualified name: `layers` (names, or a filter
    `fn(module, name)` such as `penjing.layers.types(nn.Linear)` applied to the prunable
    layers), or every prunable layer.

    `conv1d=True` counts transformers' Conv1D (GPT-2) as prunable: for what does not care
    which way a weight is laid out (magnitude, weight sharing). Without it, a model that
    has Conv1D layers is told that they were left out.

    A name that does not exist, or names a layer type we cannot handle, is an error that
    lists what would work; so is a filter that accepts no prunable layer.
    """
    modules = dict(model.named_modules())
    kinds = (*PRUNABLE, HFConv1D) if conv1d else PRUNABLE
    if not conv1d and (layers is None or callable(layers)):  # named layers are checked below
        left = [n for n, m in modules.items() if is_conv1d(m)]
        if left:
            warnings.warn(
                f"{len(left)} transformers Conv1D layers (GPT-2's, weights stored (in, out)) "
                f"left out, e.g. {left[0]!r}: this method handles Linear and Conv layouts "
                "only", PenjingWarning, stacklevel=3)
    if callable(layers):
        found = {n: m for n, m in modules.items() if isinstance(m, kinds) and layers(m, n)}
        if not found:
            prunable = sorted(n for n, m in modules.items() if isinstance(m, kinds))
            raise ValueError(f"the layer filter {layers!r} accepts none of the prunable "
                             f"layers {prunable[:8]}")
        return found
    if layers is None:
        found = {name: m for name, m in modules.items() if isinstance(m, kinds)}
        if not found:
            raise UnsupportedLayerError(
                f"{type(model).__name__} has no Linear or Conv layer to prune or share"
            )
        return found
    chosen = {}
    prunable = sorted(n for n, m in modules.items() if isinstance(m, kinds))
    for name in layers:
        if name not in modules:
            raise ValueError(f"no layer named {name!r} in the model; prunable layers: {prunable}")
        module = modules[name]
        if not isinstance(module, (*kinds, *LOOKUPS)):
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


# --- in a model file: the "parametrize" step ------------------------------------------

KINDS = {Mask: "mask", SharedWeights: "shared"}  # live parametrizations a model file keeps


def live(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """{layer: {tensor: kinds}} of the masks and shared weights on `model`, in the order
    they sit on each tensor: the "parametrize" record a model file keeps. A parametrization
    that names the step keeping it (`history_op`, as quantizers do) is left to that step;
    any other is an error that says how to save the model."""
    found: dict[str, dict[str, list[str]]] = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor, chain in module.parametrizations.items():
            kinds = []
            for p in chain:
                kind = KINDS.get(type(p))
                if kind is None and getattr(p, "history_op", None) is None:
                    raise UnsupportedLayerError(
                        f"{name or type(model).__name__}.{tensor} carries a "
                        f"{type(p).__name__} parametrization, which a model file cannot "
                        "rebuild; save a copy with it baked in (penjing.finalize_) or remove it"
                    )
                if kind is not None:
                    kinds.append(kind)
            if kinds:
                found.setdefault(name, {})[tensor] = kinds
    return found


def pack_(state: dict[str, torch.Tensor], layers: dict) -> None:
    """Store masks as booleans and shared-weight codes in the smallest integer that holds
    them (int64 codes of 2^bits centroids would waste 7 bytes each), in place."""
    for layer, tensors in layers.items():
        for tensor, kinds in tensors.items():
            for i, kind in enumerate(kinds):
                prefix = f"{layer}.parametrizations.{tensor}.{i}".lstrip(".")
                if kind == "mask":
                    state[f"{prefix}.mask"] = state[f"{prefix}.mask"] != 0
                elif kind == "shared":
                    codes = state[f"{prefix}.codes"]
                    small = codes.numel() == 0 or int(codes.max()) < 256
                    state[f"{prefix}.codes"] = codes.to(torch.uint8 if small else torch.int32)


def unpack_(state: dict[str, torch.Tensor]) -> None:
    """The inverse of `pack_`: float masks and int64 codes again, in place."""
    for key, value in state.items():
        if key.endswith(".mask") and value.dtype == torch.bool:
            state[key] = value.float()
        elif key.endswith(".codes") and value.dtype in (torch.uint8, torch.int32):
            state[key] = value.long()


def _replay(model: nn.Module, record: dict, tensors) -> nn.Module:
    """Put empty masks and shared-weight tables where the file has them; loading the
    state fills them in."""
    for layer, per_tensor in record["layers"].items():
        module = model.get_submodule(layer)
        for tensor, kinds in per_tensor.items():
            for i, kind in enumerate(kinds):
                shape = getattr(module, tensor).shape
                if kind == "mask":
                    p = Mask(torch.ones(shape))
                elif kind == "shared":
                    key = f"{layer}.parametrizations.{tensor}.{i}.centroids".lstrip(".")
                    if key not in tensors or tensors[key].dim() != 1:
                        raise ValueError(f"no centroids {key!r} for the shared weights")
                    p = SharedWeights(torch.zeros(tensors[key].shape),
                                      torch.zeros(shape, dtype=torch.long))
                else:
                    raise ValueError(f"unknown parametrization {kind!r} on {layer}.{tensor}")
                parametrize.register_parametrization(module, tensor, p, unsafe=True)
    return model


STEP = Step("parametrize", _replay,
            help="live pruning masks and shared weights, kept live in a model file")
