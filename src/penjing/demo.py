"""The Deep Compression demo: dense LeNet → pruned, weight-shared, entropy-coded .pjz →
reloaded.

Accuracy of the compressed model is measured on a fresh model filled from the file on
disk, so the figure covers every step, the codec included. The table says how the file
stores each layer and, beside it, what the paper's own format (relative-index sparse,
fixed-width or Huffman-coded) would take for the same weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
import textwrap
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from penjing import codec, data, models
from penjing.analysis.report import TABLE_LEGEND, format_table, paper_table, weight_histograms
from penjing.codec import entropy, huffman, relindex
from penjing.core.checkpoint import load_checkpoint, save_checkpoint
from penjing.io import atomic_write_bytes
from penjing.pipeline import RECIPES, DeepCompression, deep_compression_
from penjing.train import evaluate, fit


def dense_baseline(
    model_name: str,
    out: Path,
    train_loader,
    *,
    epochs: int = 10,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> torch.nn.Module:
    """The trained dense model, from the cache in `out` when an identical run made it."""
    cache = out / f"dense-{model_name}-e{epochs}-s{seed}.safetensors"
    torch.manual_seed(seed)
    model = models.create(model_name)
    if cache.exists():
        log(f"dense baseline: loaded from {cache}")
        return load_checkpoint(cache, model)
    fit(model, train_loader, epochs=epochs, seed=seed, progress=progress, desc="dense")
    save_checkpoint(model, cache)
    log(f"dense baseline: trained {epochs} epochs, cached in {cache}")
    return model


def paper_format(tensor: torch.Tensor, index_bits: int) -> dict:
    """Bytes of `tensor` in the Deep Compression paper's storage: every non-zero (and every
    padding zero a long run needs) as an `index_bits`-bit gap and a codebook code, the
    codebook at the tensor's element size. "pq": both fields fixed-width (the paper's P+Q);
    "pqh": both streams Huffman-coded, code tables included (P+Q+H)."""
    flat = tensor.detach().cpu().flatten().numpy()
    nonzero = flat != 0
    book = np.unique(flat[nonzero])
    codes = np.zeros(flat.size, dtype=np.int64)
    codes[nonzero] = np.searchsorted(book, flat[nonzero]) + 1  # code 0 is the zero
    gaps, values = relindex.encode(codes, index_bits)
    codebook = book.size * flat.itemsize
    fixed = math.ceil(gaps.size * (index_bits + huffman.fixed_width_bits(book.size + 1)) / 8)
    coded = len(huffman.encode(gaps)) + len(huffman.encode(values))
    return {"index_bits": index_bits, "pq": fixed + codebook, "pqh": coded + codebook}


def stream_coders(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{tensor: {stream: coder}} of a .pjz file that `codec.load` has checked: each coded
    section's first byte names its coder (docs/format.md)."""
    raw = Path(path).read_bytes()
    _, _, _, length, _ = struct.unpack_from("<4sHHQI", raw)
    manifest = json.loads(zlib.decompress(raw[20 : 20 + length]))
    offset, coders = 20 + length, {}
    for entry in manifest["tensors"]:
        for kind, size, _ in entry["sections"]:
            if kind in ("codes", "gaps", "values"):
                coders.setdefault(entry["name"], {})[kind] = entropy.coder(
                    raw[offset : offset + size])
            offset += size
    return coders


def run_demo(
    model_name: str = "lenet300",
    out: str | os.PathLike = "runs/demo",
    *,
    recipe: DeepCompression | None = None,
    dense_epochs: int = 10,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the whole demo and write model.pjz, metrics.json, report.md and plots to `out`.

    Returns the metrics that metrics.json holds.
    """
    if model_name not in RECIPES:
        raise ValueError(f"the demo runs {sorted(RECIPES)}, got {model_name!r}")
    recipe = recipe or replace(RECIPES[model_name], seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = data.mnist()
    train_loader, test_loader = data.loaders(split, batch_size=64, seed=seed)
    started = time.perf_counter()

    model = dense_baseline(
        model_name, out, train_loader, epochs=dense_epochs, seed=seed, progress=progress, log=log
    )
    stages = deep_compression_(
        model, train_loader, recipe, test_loader=test_loader, progress=progress, log=log
    )
    pjz = out / "model.pjz"
    saved = codec.save(model, pjz, index_bits=recipe.index_bits)

    fresh = models.create(model_name)
    fresh.load_state_dict(codec.load(pjz))
    compressed_accuracy = evaluate(fresh, test_loader)
    loaded = fresh.state_dict()
    exact = all(torch.equal(t, loaded[k]) for k, t in model.state_dict().items())
    names = [f"{name}.weight" for name in recipe.layers]
    state = model.state_dict()
    bits = recipe.index_bits
    paper = {name: paper_format(state[name], bits[name]) for name in names}
    rows = paper_table(saved, names, coders=stream_coders(pjz), paper=paper)
    log("")
    log(format_table(rows))
    log(textwrap.fill(TABLE_LEGEND, 100))
    dense_accuracy = stages.accuracy["dense"]
    metrics = {
        "model": model_name,
        "dense_accuracy": dense_accuracy,
        "compressed_accuracy": compressed_accuracy,
        "accuracy_change_points": 100 * (compressed_accuracy - dense_accuracy),
        "stage_accuracy": stages.accuracy,
        "dense_bytes": saved.original_bytes,
        "compressed_bytes": saved.compressed_bytes,
        "compression_ratio": saved.ratio,
        "coding_saving": saved.coding_saving,
        "loaded_bit_exact": exact,
        "test_images": len(split.test),
        "seconds": time.perf_counter() - started,
        "recipe": asdict(recipe),
        "layers": rows,
    }
    log(
        f"\naccuracy: dense {dense_accuracy:.2%}, from {pjz} {compressed_accuracy:.2%} "
        f"({metrics['accuracy_change_points']:+.1f} points); size {saved.original_bytes:,} B -> "
        f"{saved.compressed_bytes:,} B = {saved.ratio:.1f}× smaller; "
        f"entropy coding saved {saved.coding_saving:.1%} over fixed-width codes"
    )
    plots = weight_histograms(
        {s: stages.weights[s] for s in ("dense", "pruned", "quantized")}, out
    )
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    atomic_write_bytes(out / "report.md", _report(metrics, rows, plots).encode())
    log(f"wrote {pjz}, {out / 'metrics.json'}, {out / 'report.md'}")
    return metrics


def _report(metrics: dict, rows: list[dict], plots: dict[str, Path]) -> str:
    lines = [
        f"# Deep Compression of {metrics['model']}",
        "",
        f"Measured in this run on the MNIST subset's {metrics['test_images']:,} test images; "
        "the compressed accuracy comes from a fresh model loaded from `model.pjz`.",
        "",
        "| | dense | compressed |",
        "|---|---|---|",
        f"| accuracy | {metrics['dense_accuracy']:.2%} | {metrics['compressed_accuracy']:.2%} |",
        f"| bytes | {metrics['dense_bytes']:,} | {metrics['compressed_bytes']:,} |",
        "",
        f"Compression ratio **{metrics['compression_ratio']:.1f}×** (all tensors and the file "
        f"header counted); entropy coding saved {metrics['coding_saving']:.1%} over "
        "fixed-width codes.",
        "",
        "Accuracy after each stage: "
        + ", ".join(f"{k} {v:.2%}" for k, v in metrics["stage_accuracy"].items()),
        "",
        "## Per layer",
        "",
        TABLE_LEGEND,
        "",
        format_table(rows, markdown=True),
        "",
        "## Weight distribution",
        "",
    ]
    for stage, path in plots.items():
        lines += [f"![{stage}]({path.name})", ""]
    return "\n".join(lines)
