"""Fuzz every penjing loader with structure-aware mutations (`make fuzz`).

Runs `--inputs` mutated files (.pjz through penjing.codec.load and penjing.load, plain,
pruned and quantized checkpoints, penjing.save model files, `penjing inspect`, recipes;
checksums mostly recomputed) through the loaders in worker processes, each input under a
watchdog, and
writes the `fuzz` section of BENCHMARKS.md: inputs per loader, exceptions by type (every
one that is not a penjing.errors type is a failure), the slowest input, peak memory, and
how long valid .pjz files of growing size take to load (linear in their size).

    .venv/bin/python bench/fuzz.py                 # 100,000 inputs, writes BENCHMARKS.md
    .venv/bin/python bench/fuzz.py --quick         # 2,000 inputs, prints only

Failing inputs are saved under runs/fuzz/ to reproduce them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_section

sys.path.insert(0, str(ROOT / "tests" / "fuzz"))

SHARES = {"pjz": 0.3, "checkpoint": 0.1, "pruned": 0.1, "quantized": 0.05, "model": 0.15,
          "pjz_model": 0.1, "inspect": 0.1, "recipe": 0.1}
KEEP_FAILURES = 20  # per worker, written to runs/fuzz/


def _worker(args: tuple[int, int]) -> object:
    import harness
    import torch

    seed, inputs = args
    torch.set_num_threads(1)
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else None))
    fuzzer = harness.Fuzzer(folder, seed=seed)
    stats = fuzzer.campaign(inputs, SHARES, progress=5_000)
    stats.failures = stats.failures[:KEEP_FAILURES]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2,000 inputs, no BENCHMARKS.md")
    args = parser.parse_args()
    inputs = 2_000 if args.quick else args.inputs
    per = [inputs // args.workers + (i < inputs % args.workers) for i in range(args.workers)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        parts = pool.map(_worker, [(args.seed * 1000 + i, n) for i, n in enumerate(per)])
    wall = time.perf_counter() - start

    import harness

    total = harness.Stats()
    for s in parts:
        total.inputs.update(s.inputs)
        total.accepted.update(s.accepted)
        total.exceptions.update(s.exceptions)
        total.failures += s.failures
        total.mutator_errors += s.mutator_errors
        total.slowest = max(total.slowest, s.slowest)
        total.peak_memory = max(total.peak_memory, s.peak_memory)
    out = ROOT / "runs" / "fuzz"
    for i, (kind, error, data) in enumerate(total.failures):
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{i:03d}-{kind}-{error}.bin").write_bytes(data)

    rows = [
        "| loader | inputs | loaded | refused (penjing.errors) |",
        "|---|---:|---:|---:|",
    ]
    for kind in harness.KINDS:
        n, ok = total.inputs[kind], total.accepted[kind]
        bad = sum(1 for k, _, _ in total.failures if k == kind)
        rows.append(f"| {kind} | {n:,} | {ok:,} | {n - ok - bad:,} |")
    failures = ", ".join(f"{k}: {v:,}" for k, v in total.exceptions.most_common()) or "none"
    lines = [
        "Structure-aware fuzzing of every loader (`tests/fuzz/harness.py`): valid files "
        "edited in their manifests, shapes, counts, Huffman and rANS headers, one-symbol "
        "streams and thousand-fold tensor lists, change lists, histories, quantization "
        "configs, hash keys and tensors (checksums and hashes mostly recomputed), and "
        "recipes edited in their values, stage order and YAML aliases. A failure is any "
        "exception that is not a `penjing.errors` type, an input over "
        f"{harness.SLOW_S:g} s + {harness.SLOW_PER_FILE_BYTE_S * 1e6:g} µs per file byte + "
        f"{harness.SLOW_PER_BYTE_S * 1e6:g} µs per decoded byte, a peak resident memory "
        f"over {harness.MEMORY_FACTOR}x the decoded size + {harness.MEMORY_FIXED >> 20} MiB, "
        "or a model file that loads although forged (hash not recomputed, or only its "
        "history or config edited) and computes something its seed does not.",
        "",
        *rows,
        "",
        f"- inputs: {total.total:,} in {wall:,.0f} s ({args.workers} worker processes)",
        f"- failures by type: {failures}",
        f"- mutations that failed in the harness itself (the seed ran instead): "
        f"{total.mutator_errors:,}",
        f"- slowest input: {total.slowest[0]:.3f} s ({total.slowest[1]})",
        f"- peak memory of one input: {total.peak_memory / 2**20:.1f} MiB above the "
        "process before it",
        "",
        "Loading valid .pjz files (one pruned, 32-value float32 tensor, 90 % zeros), "
        "median of 3:",
        "",
        "| decoded | file | load | per MiB |",
        "|---:|---:|---:|---:|",
    ]
    for mb in (1, 4, 16, 64):
        size, seconds = harness.load_seconds(mb)
        lines.append(f"| {mb} MiB | {size / 1024:,.0f} KiB | {seconds:.3f} s | "
                     f"{seconds / mb * 1000:.1f} ms |")
    body = "## Fuzzing the loaders\n\n" + "\n".join(lines)
    print(body)
    write_section("fuzz", body, quick=args.quick)
    if total.failures:
        print(f"{len(total.failures)} failing inputs saved under {out}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
