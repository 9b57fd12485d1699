"""Deployment: ONNX export (FP32 and QDQ INT8) and ONNX Runtime timing."""

from __future__ import annotations

from penjing.export.check import Agreement, compare_with_ort, output_step
from penjing.export.onnx_file import onnx
from penjing.export.ort import (
    cpu_saturates_int8,
    optimized_ops,
    ort_accuracy,
    ort_latency,
    ort_run,
    session,
)

__all__ = [
    "Agreement",
    "compare_with_ort",
    "cpu_saturates_int8",
    "onnx",
    "optimized_ops",
    "ort_accuracy",
    "ort_latency",
    "ort_run",
    "output_step",
    "session",
]
