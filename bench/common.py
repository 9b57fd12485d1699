"""Helpers shared by the benchmarks: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing


def minilm_bench():
    """bench/transformers.py as a module named `minilm_bench`: imported as `transformers`
    it would hide the package it benchmarks (the script drops bench/ from sys.path itself,
    so the package is what `import transformers` finds afterwards)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "minilm_bench", Path(__file__).resolve().with_name("transformers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> str:
    """One line saying where the figures were measured."""
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({threads} thread{'s' if threads != 1 else ''}), numpy {numpy.__version__}, "
        f"Python {platform.python_version()}"
    )


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=ROOT, capture_output=True, text=True,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_section(name: str, body: str, quick: bool = False, reproduce: str | None = None) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md, keeping the others.

    `name` is also the script's: bench/<name>.py wrote the section and reproduces it.

    A quick smoke run (`quick=True`) leaves the file alone: its figures are not the
    reference ones. `reproduce` replaces the default command in the footer (a benchmark
    that needs its own environment).
    """
    if quick:
        print(f"quick run: BENCHMARKS.md left as it was (section {name!r} not written)")
        return
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    reproduce = reproduce or (f"`.venv/bin/python bench/{name}.py` (`make bench` runs every "
                              "benchmark)")
    section = (
        f"{start}\n{body.rstrip()}\n\n_Measured {stamp} at revision {git_revision()} on "
        f"{machine()}. Reproduce with {reproduce}._\n{end}"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else (
        "# Benchmarks\n\nEvery figure here is written by a script under `bench/`; "
        "none is typed by hand. Ratios are measured side by side in one run.\n"
    )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + section + "\n"
    )
    tmp = BENCHMARKS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCHMARKS)


# ONNX Runtime's calibration methods, by the names penjing's observers use
PEER_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def peer_quantize(fp32: Path, out: Path, calib: list, method: str,
                  preprocess: bool = False) -> Path:
    """ONNX Runtime's quantize_static on our FP32 export: QDQ with u8 activations per
    tensor and s8 weights per channel (the format penjing writes), the same calibration
    batches, weights reduced to 7 bits where the CPU needs it. `method` is a key of
    PEER_METHODS; `preprocess` runs `quant_pre_process` (shape inference + graph
    optimization) first, as its docs recommend for large models."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from penjing.export import cpu_saturates_int8

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x.numpy()} for x in calib])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    source = fp32
    if preprocess:
        source = out.with_name(out.stem + "-pre.onnx")
        quant_pre_process(str(fp32), str(source))
    quantize_static(
        str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        reduce_range=cpu_saturates_int8(),
        calibrate_method=getattr(CalibrationMethod, PEER_METHODS[method]),
    )
    return out


def latencies(paths: dict, x, rounds: int, per_round: int, *, threads: int = 2,
              warmup: int = 5, accuracy_levels: dict | None = None) -> dict:
    """Median seconds per ONNX Runtime run of each file on `x` (a tensor for the file's
    one input, or a dict of tensors by input name), measured in interleaved rounds so
    that a slow spell on a shared machine hits every file alike. `accuracy_levels`
    ({key: level}) sets the MatMulNBits accuracy level of some files' sessions."""
    from penjing.export import session

    levels = accuracy_levels or {}
    sessions = {k: session(p, threads, accuracy_level=levels.get(k, 1))
                for k, p in paths.items()}
    feeds = {k: ({n: v.numpy() for n, v in x.items()} if isinstance(x, dict)
                 else {s.get_inputs()[0].name: x.numpy()}) for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up: allocations and kernel choice
        for _ in range(warmup):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def alternating(timers: list, rounds: int) -> list[list[float]]:
    """Each timer's results over `rounds` rounds that take turns, so that a slow spell on a
    shared machine hits every timer alike."""
    results: list[list[float]] = [[] for _ in timers]
    for _ in range(rounds):
        for k, timer in enumerate(timers):
            results[k].append(timer())
    return results


def alternating_medians(timers: list, rounds: int) -> list[float]:
    """Median of each timer's results over `rounds` rounds that take turns."""
    return [statistics.median(r) for r in alternating(timers, rounds)]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
