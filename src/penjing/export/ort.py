"""Run and time ONNX files in ONNX Runtime on the CPU, in this process."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from penjing.errors import MissingDependencyError

Inputs = torch.Tensor | np.ndarray | Sequence | Mapping


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - onnxruntime is a dependency
        raise MissingDependencyError(
            "running ONNX files needs onnxruntime; install it with `pip install onnxruntime`"
        ) from err
    return onnxruntime


# MatMulNBits accuracy levels ONNX Runtime knows: unset, fp32, fp16, bf16, int8 compute
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _options(ort, path: str | os.PathLike, level, accuracy_level: int = 1):
    """Session options for `path` at graph optimization `level`, shared by every session
    we open, so that each runs the graph the same way."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist")
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    # A weight-only DequantizeLinear → MatMul (e.g. attention projections) becomes
    # MatMulNBits; at ORT's default accuracy level 4 it quantizes the float activations
    # to int8 on the fly, which the model never asked for. Level 1 computes in float.
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(
            f"accuracy_level must be one of {ACCURACY_LEVELS} (1: float compute, 4: int8 "
            f"activations in MatMulNBits), got {accuracy_level!r}"
        )
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                     str(accuracy_level))
    return options


def session(path: str | os.PathLike, threads: int = 2, *, accuracy_level: int = 1):
    """An ONNX Runtime CPU session on `path` with `threads` intra-op threads, all graph
    optimizations on (that is where QDQ pairs become integer kernels).

    `accuracy_level` is what the MatMulNBits kernels that weight-only (group-quantized)
    weights fuse into compute with: 1 keeps activations in float (the model as
    quantized); 4 quantizes them to int8 per block on the fly, ORT's own default, which
    changes the numbers a little; on an AVX2 CPU without VNNI it ran all-MiniLM-L6-v2
    faster than level 1 at batch 1 and no faster at batch 32 (bench/transformers_size.py)."""
    ort = _onnxruntime()
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = _options(ort, path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, accuracy_level)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(sess, inputs: Inputs) -> dict[str, np.ndarray]:
    """Map `inputs` (one tensor, a sequence in graph order, or a dict by name) to a feed dict."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, Mapping):
        values = dict(inputs)
    else:
        if isinstance(inputs, torch.Tensor | np.ndarray):
            inputs = [inputs]
        if len(inputs) != len(names):
            raise ValueError(
                f"the ONNX graph takes {len(names)} input(s) {names}, got {len(inputs)}"
            )
        values = dict(zip(names, inputs, strict=True))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown input name(s) {unknown}; the graph takes {names}")
    return {
        k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in values.items()
    }


def ort_run(path: str | os.PathLike, inputs: Inputs, threads: int = 2) -> list[np.ndarray]:
    """The outputs of the ONNX file at `path` on `inputs`, computed by ONNX Runtime."""
    sess = session(path, threads)
    return sess.run(None, _feed(sess, inputs))


def ort_accuracy(path: str | os.PathLike, loader: Iterable, threads: int = 2) -> float:
    """Top-1 accuracy of the ONNX file at `path` over the (inputs, labels) batches of
    `loader`, run by ONNX Runtime in one session: what the exported model scores."""
    sess = session(path, threads)
    correct = seen = 0
    for x, y in loader:
        logits = sess.run(None, _feed(sess, x))[0]
        correct += int((logits.argmax(1) == np.asarray(y)).sum())
        seen += len(y)
    if seen == 0:
        raise ValueError("cannot evaluate on an empty loader; give it at least one batch")
    return correct / seen


def ort_latency(
    path: str | os.PathLike,
    inputs: Inputs,
    threads: int = 2,
    repeats: int = 50,
    warmup: int = 5,
) -> float:
    """Median wall time in seconds of one ONNX Runtime run of `path` on `inputs`.

    Runs `warmup` untimed calls first (allocations, kernel selection), then `repeats`
    timed ones; the median resists the odd slow run on a shared machine.
    """
    return ort_latency_spread(path, inputs, threads, repeats, warmup)[0]


def ort_latency_spread(
    path: str | os.PathLike,
    inputs: Inputs,
    threads: int = 2,
    repeats: int = 50,
    warmup: int = 5,
) -> tuple[float, float]:
    """(median seconds of one ONNX Runtime run, interquartile range over the median), as
    `ort_latency` times them."""
    from penjing.core.counting import spread

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sess = session(path, threads)
    feed = _feed(sess, inputs)
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return spread(times) if len(times) > 1 else (times[0], 0.0)


def cpu_saturates_int8() -> bool:
    """True on x86 CPUs without VNNI, where ONNX Runtime's u8×s8 kernels add products in
    pairs into int16 with saturation, so full-range int8 weights can overflow. Quantize
    with `pj.quant.int8(reduce_range=True)` there to make integer results exact."""
    import platform

    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686"}:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return not any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def optimized_ops(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each op type ONNX Runtime runs for `path` after its graph
    optimizations (QDQ fusion included, CPU layout changes left out): shows whether a
    QDQ file really runs on integer kernels (QLinearConv, QGemm, MatMulInteger...)."""
    import tempfile
    from collections import Counter

    import onnx

    ort = _onnxruntime()
    options = _options(ort, path, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return dict(Counter(node.op_type for node in graph.node))
