"""The example recipes of `penjing compress`, each run in full from scratch.

Writes the `recipes` section of BENCHMARKS.md: per recipe, the table `penjing compress`
prints (every figure measured in that run) and its wall time. Run:
`.venv/bin/python bench/recipes.py [--quick] [--only NAME ...]`; `--quick` caps every
stage at one epoch (PENJING_EPOCHS=1 unless set) and leaves BENCHMARKS.md alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import ROOT, write_section

EXAMPLES = ROOT / "examples" / "recipes"
ORDER = ("deep_compression", "network_slimming", "int8_ptq", "prune_kd_int8")


def table(result) -> str:
    """The recipe's per-stage table as markdown."""
    from penjing.recipes.report import rows, summary

    header, body = rows(result)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if j < 2 else "---:" for j in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    text = summary(result)
    return "\n".join(lines) + "\n\n" + text[: text.index("; report in")] + "."


def from_metrics(folder: Path, name: str):
    """The result of an earlier run, rebuilt from its metrics.json (for --report)."""
    from penjing.recipes.run import CompressResult, StageResult

    data = json.loads((folder / "metrics.json").read_text())
    rows = [StageResult(**row) for row in data["stages"]]
    return CompressResult(name=name, out_dir=folder, metric=data["metric"],
                          latency_batch=data["latency_batch"], rows=rows, ran=data["ran"],
                          seconds=data["seconds"], epochs_cap=data["epochs_cap"])


def section(name: str, result, wall: float) -> str:
    return (f"### {name}\n\n`penjing compress examples/recipes/{name}.yaml`: "
            f"{wall:.0f} s wall, all stages.\n\n{table(result)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one epoch per stage")
    parser.add_argument("--only", nargs="*", choices=ORDER, help="run only these recipes")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="DIR",
                        help="run nothing: write the section from the metrics.json of "
                        "earlier full runs kept with --out in these folders")
    args = parser.parse_args()
    if args.report:
        found = {name: folder / name for name in ORDER for folder in args.report
                 if (folder / name / "metrics.json").is_file()}
        sections = []
        for name in ORDER:
            if name in found:
                result = from_metrics(found[name], name)
                sections.append(section(name, result, result.seconds))
            else:
                sections.append(f"### {name}\n\nNot measured: no finished full run of "
                                f"`examples/recipes/{name}.yaml` when this was written.")
        write_section("recipes", body(sections))
        return
    if args.quick:
        os.environ.setdefault("PENJING_EPOCHS", "1")
    from penjing.recipes import run

    names = args.only or ORDER
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        for name in names:
            started = time.perf_counter()
            result = run(EXAMPLES / f"{name}.yaml", base / name, resume=False,
                         progress=False, report=False,
                         log=lambda line, name=name: print(f"{name}: {line}", flush=True))
            wall = time.perf_counter() - started
            print(result.format(), flush=True)
            sections.append(section(name, result, wall))
    write_section("recipes", body(sections), quick=args.quick)


def body(sections: list[str]) -> str:
    load, cores = os.getloadavg()[1], os.cpu_count() or 1
    shared = (f"The machine was shared while these ran (5-minute load average {load:.1f} "
              f"on {cores} cores when this was written): wall times and eager latencies "
              "are inflated by other work; accuracies, sizes and MACs are not.\n\n"
              if load > cores else "")
    return (
        "## Example recipes (`penjing compress`)\n\n"
        "Each example recipe in `examples/recipes/` run from scratch by "
        "`penjing.recipes.run` (what `penjing compress` calls): every row is the model "
        "after that stage, measured in the run. Accuracy is top-1 on the 1,000 test "
        "images; Δ is in points against the model before the first prune or quantize "
        "stage; params and non-zero count every parameter; MACs per image; on disk is "
        "the stage's file (`penjing.save` safetensors, the .pjz or the .onnx; masks "
        "and k-means codes make a pruned or shared model's safetensors larger, the .pjz "
        "is where they pay); latency is one eager forward pass at batch 1, except the "
        "export rows, which are ONNX Runtime's (2 threads), as is their accuracy.\n\n"
        + shared + "\n\n".join(sections)
    )


if __name__ == "__main__":
    main()
