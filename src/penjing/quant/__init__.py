"""Quantization: linear (PTQ, QAT, weight-only, BN folding) and k-means weight sharing."""

from __future__ import annotations

from penjing.errors import renamed
from penjing.quant.cast import Cast, CastReport, cast, cast_report
from penjing.quant.checkpoint import load_quantized, save_quantized
from penjing.quant.config import QUANTIZABLE, QuantConfig, int8, select, weight_only
from penjing.quant.dfq import (
    BIAS_CORRECTIONS,
    correct_bias_analytic_,
    correct_bias_empirical_,
    dfq,
    input_means,
)
from penjing.quant.dynamic import DynamicLinear, dynamic
from penjing.quant.equalize import ChannelClip, Equalization, Pair, equalize
from penjing.quant.fakequant import ActQuant, WeightQuant, get_weight_quant, weight_qparams
from penjing.quant.fold import fold_bn_
from penjing.quant.kmeans import INITS, KMeansResult, check_bits, kmeans_1d
from penjing.quant.linear import (
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
from penjing.quant.lowbit import (
    BinaryConfig,
    BinaryWeight,
    Log2Config,
    Log2Weight,
    TernaryConfig,
    TernaryWeight,
    XnorInput,
    binarize,
    binarize_,
    inq_,
    inq_step_,
    log2_,
    log2_quantize,
    ternarize,
    ternarize_,
)
from penjing.quant.mixed import (
    MIXED_BITS,
    MixedPrecision,
    choose_bits,
    sensitivity,
    uniform_bits,
)
from penjing.quant.observers import OBSERVERS, Observer, make_observer
from penjing.quant.ptq import (
    activation_quantizers,
    calibrate_,
    freeze_,
    prepare,
    ptq,
    qat,
    quantize_,
)
from penjing.quant.report import LayerStats, format_layers, layer_report
from penjing.quant.shared import KMeansConfig, SharedWeights, SharingInfo, get_shared, kmeans_
from penjing.quant.smooth import ScaledInput, Smoothing, smooth_

__all__ = [
    "BinaryConfig",
    "KMeansConfig",
    "Log2Config",
    "TernaryConfig",
    "DynamicLinear",
    "dynamic",
    "MIXED_BITS",
    "MixedPrecision",
    "choose_bits",
    "sensitivity",
    "uniform_bits",
    "Cast",
    "CastReport",
    "cast",
    "cast_report",
    "BinaryWeight",
    "Log2Weight",
    "TernaryWeight",
    "XnorInput",
    "binarize",
    "binarize_",
    "inq_",
    "inq_step_",
    "log2_",
    "log2_quantize",
    "ternarize",
    "ternarize_",
    "BIAS_CORRECTIONS",
    "ChannelClip",
    "Equalization",
    "Pair",
    "correct_bias_analytic_",
    "correct_bias_empirical_",
    "dfq",
    "equalize",
    "input_means",
    "INITS",
    "OBSERVERS",
    "QUANTIZABLE",
    "ActQuant",
    "KMeansResult",
    "LayerStats",
    "Observer",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantConfig",
    "QuantSpec",
    "SharedWeights",
    "SharingInfo",
    "WeightQuant",
    "activation_quantizers",
    "calibrate_",
    "check_bits",
    "dequantize",
    "fake_quantize",
    "fold_bn_",
    "format_layers",
    "freeze_",
    "get_shared",
    "get_weight_quant",
    "int8",
    "kmeans_",
    "kmeans_1d",
    "layer_report",
    "load_quantized",
    "make_observer",
    "prepare",
    "ptq",
    "qat",
    "qparams",
    "quantize",
    "quantize_",
    "save_quantized",
    "select",
    "sqnr",
    "weight_only",
    "weight_qparams",
    "ScaledInput",
    "Smoothing",
    "smooth_",
]

# names of earlier releases, answered with a DeprecationWarning
__getattr__ = renamed(__name__, {"inq": "inq_"})
