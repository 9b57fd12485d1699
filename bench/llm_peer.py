"""llm-compressor on the same model, calibration text and evaluation windows as bench/llm.py.

llm-compressor 0.14 pins an older transformers than penjing's, so it runs in its own
environment (`make bench-llm-peer` builds `.venv-llmc` from constraints-llmc.txt, with
penjing installed there without its dependencies for the data and perplexity code). Each
row starts from the float model: its GPTQModifier at W4 in asymmetric groups of 64
(activation order "static", as penjing's GPTQ default) and its AWQModifier on the same grid
(groups of 64: SmolLM2's 576 columns hold 4.5 groups of 128, and llm-compressor's forward
cannot run a short last group), its SparseGPTModifier and
WandaPruningModifier at 50 % and 2:4, the block Linear layers only (the head kept).

Writes runs/llm_peer.json: per row the perplexity with every window's NLL (so that
bench/llm.py can compare paired, window by window) and the seconds; bench/llm.py puts the
rows into its table when the windows match. Run: `.venv-llmc/bin/python bench/llm_peer.py
[--quick]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/transformers.py would hide the transformers package that llm-compressor imports:
# bench/ goes to the end of the path, where llm_model.py is still found
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _BENCH] + [str(_BENCH)]

import torch  # noqa: E402
from llm_model import smollm2, windows_key  # noqa: E402

from penjing.data import lm_windows, perplexity, wiki_articles  # noqa: E402
from penjing.io import atomic_write_bytes  # noqa: E402

WINDOW, CALIB, CALIB_BATCH = 512, 48, 8  # as bench/llm.py
GROUP = 64
OUT = _BENCH.parent / "runs" / "llm_peer.json"


def _tokens(tokenizer, split: str) -> torch.Tensor:
    text = "\n\n".join(wiki_articles(split))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def _recipes() -> list[tuple[str, object]]:
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    # groups of 64: SmolLM2's 576 columns hold 4.5 groups of 128, and llm-compressor's
    # forward cannot run a short last group (penjing's can: its rows use 128)
    def weights(bits: int, **extra) -> dict:
        return {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": GROUP, **extra}}}

    def gptq(bits: int):
        return GPTQModifier(config_groups=weights(bits, actorder="static"), ignore=["lm_head"],
                            dampening_frac=0.01, block_size=128)

    def awq(bits: int):  # the scale search, then the grid it searched for
        return [AWQModifier(), QuantizationModifier(config_groups=weights(bits),
                                                    ignore=["lm_head"])]

    prune = {"targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    return [
        ("W4 g64, GPTQ", gptq(4)),
        ("W4 g64, AWQ", awq(4)),
        ("50 %, SparseGPT", SparseGPTModifier(sparsity=0.5, mask_structure="0:0", **prune)),
        ("2:4, SparseGPT", SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **prune)),
        ("50 %, Wanda", WandaPruningModifier(sparsity=0.5, mask_structure="0:0", **prune)),
        ("2:4, Wanda", WandaPruningModifier(sparsity=0.5, mask_structure="2:4", **prune)),
    ]


def main() -> None:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few windows, two rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    model, tokenizer = smollm2()
    evaluation = lm_windows(_tokens(tokenizer, "eval"), WINDOW, count=4 if args.quick else 16)
    calib_ids = lm_windows(_tokens(tokenizer, "calib"), WINDOW, count=8 if args.quick else CALIB)
    data = Dataset.from_dict({"input_ids": calib_ids.tolist(),
                              "attention_mask": torch.ones_like(calib_ids).tolist()})
    rows = []
    recipes = _recipes()
    if args.quick:
        recipes = [r for r in recipes if r[0] in ("W4 g64, GPTQ", "2:4, SparseGPT")]
    for name, recipe in recipes:
        work = copy.deepcopy(model)
        t = time.perf_counter()
        oneshot(model=work, dataset=data, recipe=recipe, num_calibration_samples=len(calib_ids),
                max_seq_length=WINDOW, batch_size=CALIB_BATCH, shuffle_calibration_samples=False)
        seconds = time.perf_counter() - t
        ppl = perplexity(work, evaluation)
        rows.append({"row": name, "ppl": ppl.value, "low": ppl.low, "high": ppl.high,
                     "window_nll": list(ppl.window_nll), "seconds": seconds})
        print(f"llm-compressor {name}: ppl {ppl.value:.2f}, {seconds:.0f} s", flush=True)
        del work
    result = {"tool": f"llm-compressor {llmcompressor.__version__}",
              "transformers": __import__("transformers").__version__,
              "windows": windows_key(evaluation), "eval_windows": len(evaluation),
              "calib_windows": len(calib_ids), "quick": args.quick, "rows": rows}
    OUT.parent.mkdir(exist_ok=True)
    atomic_write_bytes(OUT, json.dumps(result, indent=1).encode())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
