"""penjing against llm-compressor on SmolLM2-135M, side by side in one process.

llm-compressor 0.14 pins an older transformers (5.17.0) than penjing's, so this script runs
in an environment of its own (`make bench-llm-peer` builds `.venv-llmc` from
constraints-llmc.txt, with penjing installed there without its dependencies). Both tools
get the same float model, the same calibration windows and the same evaluation windows;
for each setting penjing runs, then llm-compressor, each from a fresh copy of the float
model, and the two perplexities are compared window by window (a paired bootstrap of their
ratio). Settings: W4 in asymmetric groups of 64 by GPTQ (activation order "static" in both)
and by AWQ, SparseGPT at 2:4 and Wanda at 50 %, the block Linear layers only (the head
kept). Groups of 64, not 128: SmolLM2's 576 columns hold 4.5 groups of 128, and
llm-compressor's forward cannot run a short last group (penjing's can; bench/llm.py uses 128).
Beside them, penjing alone: round-to-nearest on the same grid, and the size of the GPTQ
model file with the tied embedding / head table in INT8.

Writes the `llm_peer` section of BENCHMARKS.md. Run: `make bench-llm-peer` (or
`.venv-llmc/bin/python bench/llm_peer.py [--quick]`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/transformers.py would hide the transformers package that llm-compressor imports:
# bench/ goes to the end of the path, where this script's helpers are still found
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _BENCH] + [str(_BENCH)]

import torch  # noqa: E402
from common import write_section  # noqa: E402
from llm_model import TABLE_INT8, describe, file_bytes, smollm2, wiki_tokens  # noqa: E402

import penjing as pj  # noqa: E402
from penjing.data import lm_windows, perplexity, perplexity_ratio  # noqa: E402

WINDOW, CALIB_BATCH = 512, 8
CALIB = 16  # windows of calibration text for both tools (8 k tokens)
EVAL = 16
GROUP = 64


def _peer_recipes() -> dict[str, object]:
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    def weights(bits: int, **extra) -> dict:
        return {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": GROUP, **extra}}}

    prune = {"targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    return {
        "W4 g64, GPTQ": GPTQModifier(config_groups=weights(4, actorder="static"),
                                     ignore=["lm_head"], dampening_frac=0.01, block_size=128),
        # the scale search, then the grid it searched for
        "W4 g64, AWQ": [AWQModifier(), QuantizationModifier(config_groups=weights(4),
                                                            ignore=["lm_head"])],
        "2:4, SparseGPT": SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **prune),
        "50 %, Wanda": WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **prune),
    }


def _ours(name: str, model, calib: list[torch.Tensor]) -> None:
    configs = {
        "W4 g64, GPTQ": pj.quant.GPTQConfig(4, GROUP),
        "W4 g64, AWQ": pj.quant.AWQConfig(4, GROUP),
        "2:4, SparseGPT": pj.prune.SparseGPTConfig(n=2, m=4),
        "50 %, Wanda": pj.prune.WandaConfig(sparsity=0.5),
    }
    config = configs[name]
    if isinstance(config, pj.quant.GPTQConfig | pj.quant.AWQConfig):
        pj.quant.quantize_(model, config, calib=calib)
    else:
        pj.prune.prune_(model, config, calib=calib)


def run(quick: bool) -> tuple[list[dict], dict]:
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = smollm2()
    evaluation = lm_windows(wiki_tokens(tokenizer, "eval"), WINDOW, count=4 if quick else EVAL)
    calib_ids = lm_windows(wiki_tokens(tokenizer, "calib"), WINDOW, count=8 if quick else CALIB)
    calib = list(calib_ids.split(CALIB_BATCH))
    data = Dataset.from_dict({"input_ids": calib_ids.tolist(),
                              "attention_mask": torch.ones_like(calib_ids).tolist()})
    float_ppl = perplexity(model, evaluation)
    nearest = copy.deepcopy(model)  # penjing's baseline on the same grid
    pj.quant.quantize_(nearest, pj.quant.GPTQConfig(4, GROUP, rounding="nearest"))
    nearest_ppl = perplexity(nearest, evaluation)
    del nearest
    recipes = _peer_recipes()
    names = list(recipes)[:2] if quick else list(recipes)
    rows, sizes = [], None
    for name in names:
        row = {"row": name}
        for tool in ("penjing", "llm-compressor"):
            work = copy.deepcopy(model)
            t = time.perf_counter()
            try:
                if tool == "penjing":
                    _ours(name, work, calib)
                else:
                    oneshot(model=work, dataset=data, recipe=recipes[name],
                            num_calibration_samples=len(calib_ids), max_seq_length=WINDOW,
                            batch_size=CALIB_BATCH, shuffle_calibration_samples=False)
            except Exception as err:  # noqa: BLE001 - one tool's failure is a result too
                row[tool] = {"failed": f"{type(err).__name__}: {err}"[:200]}
                print(f"{tool} {name}: failed: {row[tool]['failed']}", flush=True)
                del work
                continue
            row[tool] = {"seconds": time.perf_counter() - t,
                         "ppl": perplexity(work, evaluation)}
            if tool == "penjing" and name == "W4 g64, GPTQ":  # the file, table in INT8 too
                pj.quant.quantize_(work, TABLE_INT8)
                sizes = {"float": file_bytes(model), "int4": file_bytes(work),
                         "int4_ppl": perplexity(work, evaluation)}
            print(f"{tool} {name}: ppl {row[tool]['ppl'].value:.2f}, "
                  f"{row[tool]['seconds']:.0f} s", flush=True)
            del work
        rows.append(row)
    meta = {"float": float_ppl, "nearest": nearest_ppl, "sizes": sizes,
            "eval": len(evaluation), "calib": len(calib_ids),
            "peer": f"llm-compressor {llmcompressor.__version__} (transformers "
                    f"{transformers.__version__})"}
    return rows, meta


def report(rows: list[dict], meta: dict) -> str:
    f = meta["float"]
    lines = [
        "## Decoder LM: penjing against llm-compressor on SmolLM2-135M",
        "",
        f"Model: {describe()}. Peer: {meta['peer']}, run in the same process. Both get "
        f"{meta['calib']} calibration windows of {WINDOW} tokens (batches of {CALIB_BATCH}) "
        f"and are scored on the same {meta['eval']} held-out windows (English Wikipedia from "
        "the gensim wheel); each row starts from a fresh copy of the float model, penjing "
        "first, then llm-compressor. Fewer calibration tokens than bench/llm.py's (48 "
        "windows), so that both tools fit in one run on 2 cores. Groups of 64: SmolLM2's "
        "576 columns hold 4.5 groups of 128, which llm-compressor's forward cannot run. "
        "Ratio: penjing's perplexity over llm-compressor's with a 95 % paired bootstrap "
        "interval over the windows; **met** when the interval is below 1, **within noise** "
        "when it holds 1 (no difference shown either way), **missed** when above.",
        "",
        f"Float: {f.value:.2f} ({f.low:.2f}–{f.high:.2f}); penjing's round-to-nearest on "
        f"the same W4 g64 grid: {meta['nearest'].value:.2f} ({meta['nearest'].low:.2f}–"
        f"{meta['nearest'].high:.2f}).",
        "",
        "| setting | penjing | llm-compressor | ratio (95 % paired) | ≤ llm-compressor | "
        "seconds (penjing / llm-compressor) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["penjing"], r["llm-compressor"]
        failed = [f"{tool}: {r[tool]['failed']}" for tool in ("penjing", "llm-compressor")
                  if "failed" in r[tool]]
        if failed:
            lines.append(f"| {r['row']} | failed | | | | {'; '.join(failed)} |")
            continue
        ratio, low, high = perplexity_ratio(a["ppl"], b["ppl"])
        verdict = "**met**, lower" if high < 1 else "**missed**" if low > 1 \
            else "**within noise**"
        pa, pb = a["ppl"], b["ppl"]
        lines.append(f"| {r['row']} | {pa.value:.2f} ({pa.low:.2f}–{pa.high:.2f}) | "
                     f"{pb.value:.2f} ({pb.low:.2f}–{pb.high:.2f}) | {ratio:.3f} "
                     f"({low:.3f}–{high:.3f}) | {verdict} | {a['seconds']:.0f} / "
                     f"{b['seconds']:.0f} |")
    rows = [r for r in rows if "failed" not in r["penjing"]]
    gptq = next((r for r in rows if r["row"] == "W4 g64, GPTQ"), None)
    if gptq is not None:
        ratio, low, high = perplexity_ratio(gptq["penjing"]["ppl"], meta["nearest"])
        lines.append(f"\npenjing GPTQ W4 g64 against its round-to-nearest: perplexity ratio "
                     f"{ratio:.3f} ({low:.3f}–{high:.3f}).")
    awq = next((r for r in rows if r["row"] == "W4 g64, AWQ"), None)
    if gptq is not None and awq is not None:
        ratio, low, high = perplexity_ratio(awq["penjing"]["ppl"], gptq["penjing"]["ppl"])
        lines.append(f"penjing AWQ beside its GPTQ at W4 g64: perplexity ratio {ratio:.3f} "
                     f"({low:.3f}–{high:.3f}).")
    sizes = meta["sizes"]
    if sizes:
        share = sizes["int4"] / sizes["float"]
        lines.append(f"Model file of penjing's GPTQ W4 g64 with the tied embedding / head "
                     f"table in INT8 per row (`pj.save`): {sizes['int4'] / 1e6:.1f} MB, "
                     f"{share:.3f}× the float file ({sizes['float'] / 1e6:.1f} MB); target "
                     f"≤ 0.3×: {'**met**' if share <= 0.3 else '**missed**'}; perplexity "
                     f"{sizes['int4_ppl'].value:.2f} with the table in INT8.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few windows, two settings")
    args = parser.parse_args()
    rows, meta = run(args.quick)
    text = report(rows, meta)
    print(text)
    write_section("llm_peer", text, quick=args.quick, reproduce="`make bench-llm-peer`")


if __name__ == "__main__":
    main()
