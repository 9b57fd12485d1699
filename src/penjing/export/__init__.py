"""Deployment: ONNX export (FP32 and QDQ INT8) and ONNX Runtime timing."""

from __future__ import annotations

from penjing.export.onnx_file import onnx
from penjing.export.ort import cpu_saturates_int8, ort_latency, ort_run, session

__all__ = ["cpu_saturates_int8", "onnx", "ort_latency", "ort_run", "session"]
