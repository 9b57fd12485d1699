"""The per-layer table of a Deep Compression run (what the file stores, beside the paper's
own format) and the weight histograms of the paper's figures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CODER_NAMES = {"huffman": "Huffman", "rans": "rANS", "fixed": "fixed-width",
               "enumerative": "enumerative"}


def paper_table(report, layer_names: list[str] | None = None, *,
                coders: dict[str, dict[str, str]] | None = None,
                paper: dict[str, dict] | None = None) -> list[dict]:
    """Per-layer rows from a `penjing.codec` CompressionReport: what the file stores.

    One row per weight tensor in `layer_names` (default: every coded tensor), one row for
    all other tensors (biases, buffers) with the file's header, one for the total.
    `coders` ({tensor: {stream: coder}}, read from the file) names how each stream was
    coded; `paper` ({tensor: {"index_bits", "pq", "pqh"}}) holds the same weights' bytes
    in the paper's relative-index format, computed its way (`penjing.demo.paper_format`).
    """
    coders = coders or {}
    paper = paper or {}
    chosen = [
        r
        for r in report.layers
        if (r.name in layer_names if layer_names is not None else r.encoding != "raw")
    ]
    rows = []
    for r in chosen:
        streams = coders.get(r.name, {})
        rows.append(
            {
                "layer": r.name,
                "weights": r.numel,
                "kept": r.kept,
                "encoding": r.encoding,
                "stored": r.encoding + (": " + ", ".join(
                    f"{stream} {CODER_NAMES.get(coder, coder)}"
                    for stream, coder in streams.items()) if streams else ""),
                "weight_bits": r.weight_bits,
                "bits_per_weight": 8 * r.total_bytes / r.numel if r.numel else 0.0,
                "weight_bits_coded": r.weight_stream.coded_bits if r.weight_stream else None,
                "index_bits": r.index_bits,
                "index_bits_coded": r.index_stream.coded_bits if r.index_stream else None,
                "weight_entropy": r.weight_stream.entropy_bits if r.weight_stream else None,
                "index_entropy": r.index_stream.entropy_bits if r.index_stream else None,
                "padding": r.padding,
                "bytes": r.total_bytes,
                "original_bytes": r.original_bytes,
                "ratio": r.ratio,
                **({f"paper_{k}": v for k, v in paper[r.name].items()} if r.name in paper
                   else {}),
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
        }
    )
    kept = sum(r.nonzero for r in chosen)
    weights = sum(r.numel for r in chosen)
    total = {
        "layer": "total",
        "weights": weights,
        "kept": kept / weights if weights else 1.0,
        "bytes": report.compressed_bytes,
        "original_bytes": report.original_bytes,
        "ratio": report.ratio,
    }
    if chosen and all(r.name in paper for r in chosen):  # the rest is stored as it is
        for key in ("paper_pq", "paper_pqh"):
            total[key] = sum(row[key] for row in rows[:-1]) + other_bytes
    rows.append(total)
    return rows


TABLE_LEGEND = (
    "stored as: the .pjz encoding of the tensor (dense: one code per weight; sparse: the "
    "relative-index gaps and codes) and the coder of each stream, the smallest of Huffman, "
    "rANS, enumerative and fixed-width. code bits: fixed-width bits per codebook code. "
    "bits/w: the tensor's bytes in the file × 8 / weights, codebook included. "
    "paper P+Q, P+Q+H: the same weights in the paper's format (relative-index sparse with "
    "i-bit gaps), fixed-width and Huffman-coded, codebook and Huffman tables included."
)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The table as aligned text for a terminal, or as a markdown table."""
    paper = any("paper_pq" in row for row in rows)
    head = ["layer", "weights", "kept", "code bits", "stored as", "bits/w", "bytes"]
    head += ["i", "paper P+Q", "paper P+Q+H"] if paper else []
    head += ["ratio"]
    body = []
    for row in rows:
        cells = [
            row["layer"],
            f"{row['weights']:,}",
            _cell(row.get("kept"), ".1%"),
            _cell(row.get("weight_bits"), "d"),
            row.get("stored", "-"),
            _cell(row.get("bits_per_weight"), ".2f"),
            f"{row['bytes']:,}",
        ]
        if paper:
            cells += [_cell(row.get("paper_index_bits"), "d"), _cell(row.get("paper_pq"), ",d"),
                      _cell(row.get("paper_pqh"), ",d")]
        cells.append(_cell(row.get("ratio"), ".1f") + ("×" if row.get("ratio") is not None else ""))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in pairs)

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
