"""One in-place entry for quantizing weights: `quantize_(model, config)`, where the type of
the config picks the method (linear weight-only, k-means sharing, binary, ternary,
power-of-two). Static INT8 of activations changes the graph, so it is `ptq`, which returns a
traced copy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from penjing.quant.awq import AWQConfig, awq_
from penjing.quant.gptq import GPTQConfig, gptq_
from penjing.quant.linear.config import QuantConfig
from penjing.quant.linear.ptq import weights_in_place_
from penjing.quant.lowbit import (
    BinaryConfig,
    Log2Config,
    TernaryConfig,
    binarize_,
    log2_,
    ternarize_,
)
from penjing.quant.sharing.shared import KMeansConfig, kmeans_


def quantize_(model: nn.Module, config: Any, *, calib: Iterable | None = None,
              qat: bool = False, order: list[str] | None = None) -> dict[str, Any]:
    """Quantize the weights of `model` in place, as `config` says; return, by layer name,
    what was added (the weight quantizer, or k-means' SharingInfo).

    - `QuantConfig` without activations (`weight_only(bits, group_size)`,
      `MixedPrecision.config()`): linear INT8 / INT4, per channel or in groups;
    - `KMeansConfig`: one of 2^bits shared centroids per layer;
    - `BinaryConfig`, `TernaryConfig`, `Log2Config`: ±α, {−α, 0, α}, {0, ±2^k};
    - `GPTQConfig`: INT4/INT3 groups with GPTQ's error correction, measured on `calib`
      (batches of real inputs), one block of a decoder at a time;
    - `AWQConfig`: the same grids, with activation-aware scales folded into the op before
      each layer and a clipping ratio per row, measured on `calib`.

    Static activation quantization changes the graph and needs calibration, so it is
    `ptq(model, calib, config)`, which returns a quantized copy; a QuantConfig with an
    activation spec here is an error that says so. `qat=True` keeps linear weight ranges
    following the weights while training.

    >>> pj.quant.quantize_(model, pj.quant.weight_only(bits=4, group_size=32))
    >>> pj.quant.quantize_(model, pj.quant.KMeansConfig(bits=5))
    """
    if isinstance(config, QuantConfig):
        if config.activation is not None:
            raise ValueError(
                "quantize_ changes weights in place; this config also quantizes activations, "
                "which needs calibration and a traced copy: use q = pj.quant.ptq(model, "
                "calib_loader, config), or weight_only(...) here"
            )
        return weights_in_place_(model, config, qat, order)
    if isinstance(config, GPTQConfig):
        if calib is None and config.rounding == "gptq":
            raise ValueError("GPTQ measures every layer on calibration data: quantize_(model, "
                             "config, calib=batches) with a few dozen sequences of real text")
        return gptq_(model, calib, config)
    if isinstance(config, AWQConfig):
        if calib is None:
            raise ValueError("AWQ scales each layer by its inputs' size on calibration data: "
                             "quantize_(model, config, calib=batches) with a few dozen "
                             "sequences of real text")
        return awq_(model, calib, config)
    run = _IN_PLACE.get(type(config))
    if run is None:
        kinds = ", ".join(["QuantConfig", *(c.__name__ for c in _IN_PLACE), "GPTQConfig",
                                    "AWQConfig"])
        raise TypeError(f"quantize_ takes one of {kinds}, got {type(config).__name__}")
    return run(model, config)


_IN_PLACE: dict[type, Callable[[nn.Module, Any], dict]] = {
    KMeansConfig: lambda m, c: kmeans_(m, dict(c.bits) if isinstance(c.bits, Mapping)
                                       else c.bits, init=c.init, layers=c.layers, seed=c.seed),
    BinaryConfig: lambda m, c: binarize_(m, c.method, layers=c.layers, first=c.first,
                                         last=c.last),
    TernaryConfig: lambda m, c: ternarize_(m, c.threshold, layers=c.layers, first=c.first,
                                           last=c.last),
    Log2Config: lambda m, c: log2_(m, c.bits, layers=c.layers, first=c.first, last=c.last,
                                   fraction=c.fraction),
}


