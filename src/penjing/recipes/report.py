"""The report of a recipe run: a table per stage in the terminal, and in the output folder
metrics.json, report.md and its plots (weight histograms per layer and stage, a size
waterfall, the metric against size)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from penjing.io import atomic_write_bytes

if TYPE_CHECKING:
    from penjing.recipes.run import CompressResult, StageResult

PLOTS = {"weights": "weights.png", "waterfall": "size_waterfall.png",
         "tradeoff": "accuracy_vs_size.png"}


def _value(result: CompressResult, row: StageResult) -> str:
    return f"{100 * row.metric:.2f}" if result.metric == "accuracy" else f"{row.metric:.4g}"


def reference(result: CompressResult) -> StageResult:
    """The row compression is measured against: the model before the first prune or
    quantize stage (the input, or what the first train stages made of it)."""
    ref = result.rows[0]
    for row in result.rows[1:]:
        if row.stage in ("prune", "quantize", "encode", "export"):
            break
        ref = row
    return ref


def _change(result: CompressResult, row: StageResult) -> str:
    """Against the reference model: points for accuracy, a plain difference otherwise."""
    first = reference(result).metric
    if result.metric == "accuracy":
        return f"{100 * (row.metric - first):+.2f}"
    return f"{row.metric - first:+.4g}"


def _bytes(n: int) -> str:
    if n == 0:
        return "-"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def rows(result: CompressResult) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the per-stage table."""
    metric = "accuracy %" if result.metric == "accuracy" else result.metric
    change = f"Δ vs {reference(result).label}" + (" (points)" if result.metric == "accuracy"
                                                  else "")
    header = ["stage", "what", metric, change, "params", "non-zero", "MACs / image",
              "on disk", f"latency ms (batch {result.latency_batch})", "time s"]
    body = []
    for r in result.rows:
        mark = "*" if r.resumed and r.index is not None else ""
        body.append([r.label + mark, r.detail, _value(result, r), _change(result, r),
                     f"{r.params:,}", f"{r.nonzero_params:,}", f"{r.macs:,}",
                     _bytes(r.bytes) + ("²" if _larger_than_dense(result, r) else ""),
                     _latency(r), f"{r.seconds:.1f}"])
    return header, body


def _latency(row: StageResult) -> str:
    """'24.000 ±3%' (half the interquartile range); ¹ marks a simulated-quantization time,
    ³ a spread too wide to compare."""
    text = f"{row.latency_ms:.3f}"
    spread = row.notes.get("latency_spread")
    if spread is not None:
        text += f" ±{spread / 2:.0%}" + ("³" if spread > WIDE_SPREAD else "")
    return text + ("¹" if row.notes.get("latency_simulated") else "")


def _larger_than_dense(result: CompressResult, row: StageResult) -> bool:
    """A stage's file larger than the float32 weights of the reference model (a pruned
    model saved with its masks, before an encode stage stores it sparse)."""
    return bool(row.bytes) and row.index is not None and row.bytes > 4 * reference(
        result).params


WIDE_SPREAD = 0.25  # interquartile range over median beyond which a latency says little


def footnotes(result: CompressResult) -> list[str]:
    """The lines that explain the marks the table uses."""
    notes = []
    if any(r.notes.get("latency_simulated") for r in result.rows):
        notes.append("¹ simulated quantization in eager PyTorch (float compute plus "
                     "rounding): not the speed of integer kernels; an export stage times the "
                     "written file in ONNX Runtime")
    if any(_larger_than_dense(result, r) for r in result.rows):
        notes.append("² larger than the float32 weights: the model file keeps pruning masks "
                     "and dense weights; an encode stage stores it sparse")
    if any((r.notes.get("latency_spread") or 0) > WIDE_SPREAD for r in result.rows):
        notes.append(f"³ timings spread by more than {WIDE_SPREAD:.0%} of their median: the "
                     "machine was busy or a pass too short to time; do not compare these")
    return notes


def format_table(result: CompressResult) -> str:
    """The terminal table: one row per stage, the input model first, then a summary."""
    header, body = rows(result)
    detail = 1  # the free-text column is cut to keep lines short
    body = [[c if j != detail or len(c) <= 48 else c[:47] + "…" for j, c in enumerate(r)]
            for r in body]
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    left = (0, 1)

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if j in left else c.rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in body]
    if any(r.resumed and r.index is not None for r in result.rows):
        lines.append("* finished in an earlier run (resumed)")
    lines += footnotes(result)
    lines.append(summary(result))
    return "\n".join(lines)


def summary(result: CompressResult) -> str:
    """One line: the metric before and after, the smallest file, the time taken."""
    ref, last = reference(result), result.rows[-1]
    sizes = [r.bytes for r in result.rows[1:] if r.bytes]
    smallest = f"; smallest file {_bytes(min(sizes))}" if sizes else ""
    if sizes and ref.params:
        smallest += f" ({4 * ref.params / min(sizes):.1f}x smaller than float32 weights)"
    cap = (f"; epochs capped at {result.epochs_cap} (PENJING_EPOCHS)"
           if result.epochs_cap is not None else "")
    return (f"{result.name}: {result.metric} {_value(result, ref)} ({ref.label}) -> "
            f"{_value(result, last)} ({last.label}){smallest}; {len(result.ran)} stage(s) "
            f"run in {result.seconds:.1f} s{cap}; report in {result.out_dir / 'report.md'}")


def metrics(result: CompressResult) -> dict[str, Any]:
    """metrics.json: every row's measurements (histograms left to the plots)."""
    data = result.to_json()
    for row in data["stages"]:
        row["notes"] = {k: v for k, v in row["notes"].items() if k != "histograms"}
    return data


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def plot_weights(result: CompressResult, path: Path) -> None:
    """One panel per layer: the histogram of its non-zero weights after each stage, as
    outlines on a log count scale (pruning hollows out the middle, sharing leaves spikes)."""
    import matplotlib.pyplot as plt
    import numpy as np

    stages = [r for r in result.rows if r.notes.get("histograms")]
    layers = list(stages[0].notes["histograms"]) if stages else []
    for r in stages[1:]:  # a layer that structured pruning removed is left out
        layers = [n for n in layers if n in r.notes["histograms"]]
    if not layers:
        return
    cols = min(len(layers), 2)
    rows_ = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows_, cols, squeeze=False, figsize=(5 * cols, 2.4 * rows_))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(stages)))
    for k, name in enumerate(layers):
        ax = axes[k // cols][k % cols]
        for r, colour in zip(stages, colours, strict=True):
            h = r.notes["histograms"][name]
            edges = np.linspace(h["lo"], h["hi"], len(h["counts"]) + 1)
            ax.stairs(np.maximum(h["counts"], 0.8), edges, color=colour, lw=1,
                      label=f"{r.label} ({h['kept']:.0%} kept)")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {stages[0].notes['histograms'][name]['size']:,} weights",
                     fontsize=8)
        ax.tick_params(labelsize=6)
    for k in range(len(layers), rows_ * cols):
        axes[k // cols][k % cols].set_visible(False)
    # one legend for all panels, below them, where it covers no data
    handles, labels = axes[0][0].get_legend_handles_labels()
    kept = {name: ", ".join(f"{r.label} {r.notes['histograms'][name]['kept']:.0%}"
                            for r in stages) for name in layers}
    for k, name in enumerate(layers):
        axes[k // cols][k % cols].set_xlabel(f"kept: {kept[name]}", fontsize=5)
    fig.legend(handles, [label.split(" (")[0] for label in labels], loc="lower center",
               ncol=min(len(labels), 6), fontsize=6, frameon=False)
    fig.suptitle("non-zero weights per layer after each stage", fontsize=9)
    fig.subplots_adjust(hspace=0.7, wspace=0.15, top=1 - 0.35 / rows_ / 2.4 * 2,
                        bottom=0.6 / (2.4 * rows_) + 0.05)
    _save(fig, path)


def plot_waterfall(result: CompressResult, path: Path) -> None:
    """Bytes on disk after each stage as steps from the float32 weights of the input."""
    import matplotlib.pyplot as plt

    start = 4 * result.rows[0].params
    labels, before, after = ["float32 input"], [0], [start]
    level = start
    for r in result.rows[1:]:
        if not r.bytes:
            continue
        labels.append(r.label)
        before.append(level)
        after.append(r.bytes)
        level = r.bytes
    floor = min(after) / 3  # sizes span orders of magnitude: a log axis, bars from here
    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 2, 3.4))
    for k, (b, a) in enumerate(zip(before, after, strict=True)):
        colour = "#8a8a8a" if k == 0 else "#2b6f5e" if a < b else "#b5523b" if a > b \
            else "#8a8a8a"
        low, high = (floor, a) if k == 0 else (min(a, b), max(a, b))
        ax.bar(k, max(high - low, high * 0.02), bottom=low, color=colour)
        ax.text(k, high * 1.05, _bytes(a), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(floor, 2.5 * max(after))
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("bytes on disk (log)")
    ax.set_title("size after each stage (green: smaller, red: larger)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_tradeoff(result: CompressResult, path: Path) -> None:
    """The metric against bytes on disk, one point per stage that wrote a file, from the
    reference model on (an untrained input model would only stretch the axis)."""
    import matplotlib.pyplot as plt

    ref = reference(result)
    after = result.rows[result.rows.index(ref) + 1:]
    points = [(ref.bytes or 4 * ref.params, ref.metric, ref.label)]
    points += [(r.bytes, r.metric, r.label) for r in after if r.bytes]
    scale = 100 if result.metric == "accuracy" else 1
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([p[0] for p in points], [scale * p[1] for p in points], "o", color="#2b6f5e")
    # points close together get their labels on alternating sides, staggered in height,
    # so that no two labels print over each other
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    for rank, i in enumerate(order):
        x, y, label = points[i]
        dy = 4 + 9 * (rank % 3)
        ax.annotate(label, (x, scale * y), fontsize=7, xytext=(4, dy if rank % 2 else -dy),
                    textcoords="offset points", va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#888888"})
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk")
    ax.set_ylabel("accuracy %" if result.metric == "accuracy" else result.metric)
    ax.set_title(f"{result.metric} against size", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def markdown(result: CompressResult) -> str:
    header, body = rows(result)
    lines = [f"# penjing compress: {result.name}", ""]
    lines += [f"- {m}" for m in result.messages]
    lines += ["", "| " + " | ".join(header) + " |",
              "|" + "|".join("---" if j < 2 else "---:" for j in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    if any(r.resumed and r.index is not None for r in result.rows):
        lines += ["", "\\* finished in an earlier run (resumed)"]
    lines += [""] + [f"{n}  " for n in footnotes(result)]
    lines += ["", summary(result), ""]
    shown = ("histograms", "latency_spread", "latency_simulated")  # plots and the table
    notes = [(r.label, {k: v for k, v in r.notes.items() if k not in shown})
             for r in result.rows]
    notes = [(label, n) for label, n in notes if n]
    if notes:
        lines += ["## Notes", ""]
        for label, n in notes:
            text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in n.items())
            lines.append(f"- {label}: {text}")
        lines.append("")
    lines += ["## Plots", "", f"![weights]({PLOTS['weights']})", "",
              f"![size waterfall]({PLOTS['waterfall']})", "",
              f"![{result.metric} against size]({PLOTS['tradeoff']})", ""]
    return "\n".join(lines)


def write_report(result: CompressResult, plots: bool = True) -> dict[str, Path]:
    """Write metrics.json, and unless `plots` is False report.md and its plots, into
    `result.out_dir`; return the paths."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json"}
    atomic_write_bytes(paths["metrics"], (json.dumps(metrics(result), indent=1) + "\n").encode())
    if not plots:
        return paths
    import matplotlib

    matplotlib.use("Agg")
    paths["report"] = out / "report.md"
    for key, draw in (("weights", plot_weights), ("waterfall", plot_waterfall),
                      ("tradeoff", plot_tradeoff)):
        paths[key] = out / PLOTS[key]
        draw(result, paths[key])
    atomic_write_bytes(paths["report"], markdown(result).encode())
    return paths
