"""The Deep Compression paper's per-layer table and the weight histograms of its figures."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def _fixed_bytes(layer) -> int:
    """Bytes the layer would take with fixed-width codes instead of Huffman (paper's P+Q)."""
    if layer.encoding == "raw":
        return layer.total_bytes
    entries = layer.weight_stream.symbols if layer.weight_stream else 0
    bits = entries * (layer.weight_bits + (layer.index_bits or 0))
    return math.ceil(bits / 8) + layer.codebook_bytes


def paper_table(report, layer_names: list[str] | None = None) -> list[dict]:
    """Rows of the paper's table from a `penjing.codec` CompressionReport.

    One row per weight tensor in `layer_names` (default: every coded tensor), one row
    for all other tensors (biases, buffers), one for the total. Huffman figures are the
    bits actually spent per stored entry, tables included.
    """
    chosen = [
        r
        for r in report.layers
        if (r.name in layer_names if layer_names is not None else r.encoding != "raw")
    ]
    rows = []
    for r in chosen:
        rows.append(
            {
                "layer": r.name,
                "weights": r.numel,
                "kept": r.kept,
                "encoding": r.encoding,
                "weight_bits": r.weight_bits,
                "weight_bits_coded": r.weight_stream.coded_bits if r.weight_stream else None,
                "index_bits": r.index_bits,
                "index_bits_coded": r.index_stream.coded_bits if r.index_stream else None,
                "weight_entropy": r.weight_stream.entropy_bits if r.weight_stream else None,
                "index_entropy": r.index_stream.entropy_bits if r.index_stream else None,
                "padding": r.padding,
                "fixed_bytes": _fixed_bytes(r),
                "bytes": r.total_bytes,
                "original_bytes": r.original_bytes,
                "ratio": r.ratio,
            }
        )
    others = [r for r in report.layers if r not in chosen]
    other_bytes = sum(r.total_bytes for r in others) + report.overhead_bytes
    rows.append(
        {
            "layer": "other tensors + header",
            "weights": sum(r.numel for r in others),
            "bytes": other_bytes,
            "original_bytes": sum(r.original_bytes for r in others),
            "fixed_bytes": other_bytes,
        }
    )
    kept = sum(r.nonzero for r in chosen)
    weights = sum(r.numel for r in chosen)
    rows.append(
        {
            "layer": "total",
            "weights": weights,
            "kept": kept / weights if weights else 1.0,
            "fixed_bytes": sum(row["fixed_bytes"] for row in rows),
            "bytes": report.compressed_bytes,
            "original_bytes": report.original_bytes,
            "ratio": report.ratio,
        }
    )
    return rows


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The table as aligned text for a terminal, or as a markdown table."""
    head = ["layer", "weights", "kept", "w bits", "w Huff", "i bits", "i Huff",
            "bytes P+Q", "bytes P+Q+H", "ratio"]
    body = [
        [
            row["layer"],
            f"{row['weights']:,}",
            _cell(row.get("kept"), ".1%"),
            _cell(row.get("weight_bits"), "d"),
            _cell(row.get("weight_bits_coded"), ".2f"),
            _cell(row.get("index_bits"), "d"),
            _cell(row.get("index_bits_coded"), ".2f"),
            f"{row['fixed_bytes']:,}",
            f"{row['bytes']:,}",
            _cell(row.get("ratio"), ".1f") + ("×" if row.get("ratio") is not None else ""),
        ]
        for row in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    lines = [fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt(cells) for cells in body[:-1]]
    lines += [lines[1], fmt(body[-1])]
    return "\n".join(lines)


def weight_histograms(
    stages: dict[str, dict[str, np.ndarray]], out_dir: str | os.PathLike, bins: int = 200
) -> dict[str, Path]:
    """One PNG per stage: the histogram of all layers' weights (non-zero after pruning).

    Returns {stage: path}. Pruning leaves the bimodal shape of the paper's figure; weight
    sharing leaves spikes at the centroids.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    everything = np.concatenate([np.concatenate(list(w.values())) for w in stages.values()])
    limit = float(np.abs(everything).max()) if everything.size else 1.0
    for stage, layers in stages.items():
        values = np.concatenate(list(layers.values()))
        shown = values if stage == "dense" else values[values != 0]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(shown, bins=bins, range=(-limit, limit), color="#2b6f5e")
        ax.set_title(f"weights, {stage}: {shown.size:,} of {values.size:,} shown")
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
        fig.tight_layout()
        path = out / f"weights_{stage}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        paths[stage] = path
    return paths
