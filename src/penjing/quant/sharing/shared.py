"""Weight sharing (Deep Compression step 2) and trained quantization (step 3).

Each layer's weight becomes `table[codes]`, where `table = [0, c_1, ..., c_k]` holds the
layer's k-means centroids after a fixed zero and `codes` is a buffer of small integers.
Code 0 is the pruned zero, so a pruned weight stays exactly zero however the centroids
move. The centroids are the only trainable part: autograd's backward of the gather sums
the gradients of all members of a cluster into their centroid, which is the paper's
centroid update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.core.parametrize import SharedWeights, get_mask, own_class_, select_layers
from penjing.quant.sharing.kmeans import INITS, check_bits, kmeans_1d


@dataclass(frozen=True)
class SharingInfo:
    """What weight sharing did to one layer."""

    clusters: int  # centroids in use (≤ 2^bits − 1 when the layer is pruned, else ≤ 2^bits)
    bits: int
    iterations: int
    mse: float  # mean squared change of the surviving weights


def get_shared(module: nn.Module) -> SharedWeights | None:
    """The weight-sharing parametrization of `module`, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, SharedWeights):
            return p
    return None


@dataclass(frozen=True)
class KMeansConfig:
    """Weight sharing: each chosen layer's weights become one of its k-means centroids
    (`pj.quant.quantize_(model, KMeansConfig(5))`; then train the centroids)."""

    bits: int | Mapping[str, int] = 5  # for all layers, or {layer name: bits}
    init: str = "linear"  # of the centroids: 'linear', 'density' or 'forgy'
    # None: every Linear and Conv; module names; or a penjing.layers filter
    layers: Sequence[str] | Callable[[nn.Module, str], bool] | None = None
    seed: int = 0  # forgy's sample

    def __post_init__(self) -> None:
        if isinstance(self.bits, Mapping):
            for name, value in self.bits.items():
                check_bits(value, f"bits of {name!r}")
            if self.layers is not None:
                raise ValueError("give layers either as the keys of bits or as layers, "
                                 "not both")
        else:
            check_bits(self.bits)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")


def kmeans_(
    model: nn.Module,
    bits: int | dict[str, int] = 5,
    *,
    init: str = "linear",
    layers: list[str] | None = None,
    seed: int = 0,
) -> dict[str, SharingInfo]:
    """Share weights in place: each layer's weights become one of its k-means centroids.

    `bits` is per layer (a dict {layer name: bits}) or for all. A pruned layer gets
    2^bits − 1 centroids over its surviving weights, so that those plus the pruned zero
    fit in `bits` bits; an unpruned layer gets 2^bits. The mask is baked in; the layer's
    zeros are kept by code 0. Train afterwards to fine-tune the centroids.

    >>> pj.quant.kmeans_(model, bits={"conv1": 8, "conv2": 8, "fc1": 5, "fc2": 5})
    """
    if isinstance(bits, dict):
        if layers is not None:
            raise ValueError("give layers either as the keys of bits or as layers=, not both")
        layers = list(bits)
    chosen = select_layers(model, layers, conv1d=True)
    # every layer is checked before any changes: a bad one leaves the model as it was
    layer_bits = {}
    for name, module in chosen.items():
        value = bits[name] if isinstance(bits, dict) else bits
        layer_bits[name] = check_bits(value, f"bits of {name!r}")
        if get_shared(module) is not None:
            raise ValueError(f"layer {name!r} already shares its weights; finalize_ it first")
    infos = {}
    for name, module in chosen.items():
        mask = get_mask(module)
        with torch.no_grad():
            weight = module.weight.detach().clone()
            if mask is not None:
                parametrize.remove_parametrizations(own_class_(module), "weight",
                                                    leave_parametrized=True)
                alive = mask != 0
                k = 2 ** layer_bits[name] - 1
            else:
                alive = torch.ones_like(weight, dtype=torch.bool)
                k = 2 ** layer_bits[name]
            survivors = weight[alive]
            codes = torch.zeros(weight.shape, dtype=torch.long)
            if survivors.numel() == 0:
                centroids, iterations, mse = torch.zeros(0), 0, 0.0
            else:
                result = kmeans_1d(survivors, k, init=init, seed=seed)
                centroids = torch.from_numpy(result.centroids).to(weight.dtype)
                labels = torch.from_numpy(result.labels)
                codes[alive] = labels.long() + 1
                iterations = result.iterations
                mse = float((survivors - centroids[labels]).double().square().mean())
        # The original weight keeps requires_grad: it gets no gradient while shared (the
        # output does not depend on it), and finalize_ makes it the layer's plain weight again.
        parametrize.register_parametrization(own_class_(module), "weight",
                                             SharedWeights(centroids, codes))
        infos[name] = SharingInfo(int(centroids.numel()), layer_bits[name], iterations, mse)
    return infos
