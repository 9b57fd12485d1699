"""Quantization: one in-place entry, `quantize_(model, config)`, whose config type picks
the method (linear weight-only INT8/INT4, k-means sharing, binary, ternary, power-of-two);
`ptq` / `qat` for static INT8 of weights and activations, which calibrate and return a
traced copy; dynamic INT8, FP16/BF16, data-free quantization, SmoothQuant-style smoothing,
and mixed precision chosen per layer.

What a user calls is in `__all__`; the quantizer modules, observers and report types are
importable from their modules.
"""

from __future__ import annotations

from penjing.errors import renamed
from penjing.quant.awq import AWQConfig, awq_
from penjing.quant.cast import cast, cast_report
from penjing.quant.datafree.dfq import dfq
from penjing.quant.datafree.equalize import equalize
from penjing.quant.gptq import GPTQConfig, gptq_
from penjing.quant.inplace import quantize_
from penjing.quant.linear.checkpoint import load_quantized, save_quantized
from penjing.quant.linear.config import QuantConfig, int8, weight_only
from penjing.quant.linear.dynamic import DynamicLinear, dynamic
from penjing.quant.linear.fakequant import ActQuant, get_weight_quant
from penjing.quant.linear.fold import fold_bn_
from penjing.quant.linear.mixed import MixedPrecision, bits_sensitivity, choose_bits, uniform_bits
from penjing.quant.linear.observers import OBSERVERS
from penjing.quant.linear.primitives import (
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    qparams,
    quantize,
    sqnr,
)
from penjing.quant.linear.ptq import (
    Guarded,
    activation_quantizers,
    calibrate_,
    freeze_,
    prepare,
    ptq,
    ptq_guarded,
    qat,
)
from penjing.quant.linear.report import layer_report
from penjing.quant.linear.smooth import smooth_
from penjing.quant.lowbit import (
    BinaryConfig,
    Log2Config,
    TernaryConfig,
    binarize_,
    inq_,
    inq_step_,
    log2_,
    ternarize_,
)
from penjing.quant.sharing.kmeans import kmeans_1d
from penjing.quant.sharing.shared import KMeansConfig, get_shared, kmeans_

__all__ = [
    # the in-place entry and its configs
    "quantize_",
    "QuantConfig",
    "int8",
    "weight_only",
    "QuantSpec",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "KMeansConfig",
    "BinaryConfig",
    "TernaryConfig",
    "Log2Config",
    "GPTQConfig",
    "AWQConfig",
    "awq_",
    "gptq_",
    # static INT8: calibrate and return a traced copy
    "ptq",
    "ptq_guarded",
    "Guarded",
    "qat",
    "prepare",
    "calibrate_",
    "freeze_",
    "OBSERVERS",
    # other ways to quantize
    "dynamic",
    "DynamicLinear",
    "cast",
    "cast_report",
    "dfq",
    "equalize",
    "fold_bn_",
    "smooth_",
    "kmeans_",
    "binarize_",
    "ternarize_",
    "log2_",
    "inq_",
    "inq_step_",
    # mixed precision
    "MixedPrecision",
    "choose_bits",
    "bits_sensitivity",
    "uniform_bits",
    # the arithmetic, and looking at a quantized model
    "qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "sqnr",
    "kmeans_1d",
    "layer_report",
    "activation_quantizers",
    "get_weight_quant",
    "get_shared",
    "ActQuant",
    # files
    "load_quantized",
    "save_quantized",
]

# names of earlier releases, answered with a DeprecationWarning
__getattr__ = renamed(__name__, {"inq": "inq_", "sensitivity": "bits_sensitivity"})
