"""Fine-tuning in one process against two under torchrun: the same accuracy, how much faster.

Writes the `distributed` section of BENCHMARKS.md. A LeNet-300-100 trained on the MNIST
subset is pruned to 90 % zeros and fine-tuned in three set-ups: one process using every
core for its threads, one process on one thread, and two ranks under
`torchrun --standalone --nproc_per_node 2` (gloo) with the cores split between them. All
take the same optimizer steps: the same epochs, the same learning rate and the same
global batch (64 in one process, 32 on each of two ranks). Accuracy over the 1,000 test
images is given per seed (seeds change the batch order), so the gap between set-ups can
be read against the spread between seeds. Wall time is the fine-tuning loop (the slower
rank's) and the whole command, start-up included. Run:
`.venv/bin/python bench/distributed.py [--quick]` (`--quick`: one seed, one epoch,
printed only, BENCHMARKS.md untouched)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, write_section

from penjing import data, distributed, models
from penjing.prune import magnitude_
from penjing.train import evaluate, fit, load_checkpoint, save_checkpoint, seed_everything

GLOBAL_BATCH = 64
SPARSITY = 0.9
DENSE_EPOCHS = 10


def worker(args: argparse.Namespace) -> None:
    """One fine-tuning run: in one process, or as one rank under torchrun."""
    torch.set_num_threads(args.threads)
    distributed.init()
    world = distributed.world_size()
    train, test = data.loaders(data.mnist(), batch_size=GLOBAL_BATCH // world, seed=args.seed)
    model = load_checkpoint(args.dense, models.create("lenet300"))
    magnitude_(model, sparsity=SPARSITY)
    pruned = evaluate(model, test)
    distributed.barrier()
    start = time.perf_counter()
    history = fit(model, train, epochs=args.epochs, seed=args.seed, progress=False)
    seconds = distributed.all_reduce(time.perf_counter() - start, "max")
    result = {"world": world, "seed": args.seed, "pruned": pruned,
              "accuracy": evaluate(model, test), "loss": history.loss, "seconds": seconds}
    distributed.main_only(Path(args.out).write_text)(json.dumps(result))


def launch(nproc: int, threads: int, seed: int, epochs: int, dense: Path, out: Path) -> dict:
    """Run `worker` in `nproc` processes of `threads` threads each; return its result with
    the command's wall time."""
    script = [str(ROOT / "bench" / "distributed.py"), "--worker", "--seed", str(seed),
              "--epochs", str(epochs), "--dense", str(dense), "--out", str(out),
              "--threads", str(threads)]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", *script]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=ROOT, capture_output=True)
    result = json.loads(out.read_text())
    result["command_seconds"] = time.perf_counter() - start
    return result


def train_dense(path: Path) -> float:
    seed_everything(0)
    model = models.create("lenet300")
    train, test = data.loaders(data.mnist(), batch_size=GLOBAL_BATCH, seed=0)
    fit(model, train, epochs=DENSE_EPOCHS, progress=False)
    save_checkpoint(model, path)
    return evaluate(model, test)


def pct(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f} %"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch; print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dense", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    seeds, epochs = ((0,), 1) if args.quick else ((0, 1, 2), 5)
    cores = os.cpu_count() or 1
    # (processes, threads each): one process on every core, one on one core, and the
    # cores split between two ranks
    setups = [(1, cores), (1, 1), (2, max(1, cores // 2))]
    runs: dict[tuple[int, int], list[dict]] = {setup: [] for setup in setups}
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense.safetensors"
        dense_acc = train_dense(dense)
        for seed in seeds:  # the set-ups side by side, seed after seed
            for nproc, threads in setups:
                out = Path(tmp) / f"{nproc}-{threads}-{seed}.json"
                result = launch(nproc, threads, seed, epochs, dense, out)
                runs[nproc, threads].append(result)
                print(f"seed {seed}, {nproc} process(es) × {threads} thread(s): "
                      f"{100 * result['accuracy']:.2f} %, fine-tuning {result['seconds']:.1f} s,"
                      f" command {result['command_seconds']:.1f} s", flush=True)

    def mean(setup: tuple[int, int], key: str) -> float:
        return statistics.mean(r[key] for r in runs[setup])

    def cells(fmt) -> str:
        return " | ".join(fmt(setup) for setup in setups)

    two = setups[-1]
    rows = [
        "| | " + cells(lambda s: f"{s[0]} process{'es' if s[0] > 1 else ''}, {s[1]} "
                       f"thread{'s' if s[1] > 1 else ''} each") + " |",
        "|---" * (len(setups) + 1) + "|",
        "| batch per process | " + cells(lambda s: str(GLOBAL_BATCH // s[0])) + " |",
        *(f"| test accuracy, seed {seed} | "
          + cells(lambda s, i=i: f"{100 * runs[s][i]['accuracy']:.2f} %") + " |"
          for i, seed in enumerate(seeds)),
        "| test accuracy, mean ± sd | "
        + cells(lambda s: pct([r["accuracy"] for r in runs[s]])) + " |",
        "| fine-tuning loop, s | " + cells(lambda s: f"{mean(s, 'seconds'):.2f}") + " |",
        "| whole command, s | " + cells(lambda s: f"{mean(s, 'command_seconds'):.1f}") + " |",
        "| loop wall-time ratio to 2 processes | "
        + cells(lambda s: f"{mean(s, 'seconds') / mean(two, 'seconds'):.2f}×") + " |",
    ]
    gaps = [b["accuracy"] - a["accuracy"] for a, b in zip(runs[setups[0]], runs[two],
                                                          strict=True)]
    body = "\n".join([
        "## Multi-process fine-tuning (torchrun)",
        "",
        f"LeNet-300-100 on the MNIST subset: trained dense for {DENSE_EPOCHS} epochs "
        f"({100 * dense_acc:.2f} %), pruned to {100 * SPARSITY:.0f} % zeros per layer "
        f"({100 * runs[setups[0]][0]['pruned']:.2f} % before fine-tuning), then fine-tuned "
        f"for {epochs} epoch{'s' if epochs > 1 else ''} with Adam at 1e-3 and a global "
        f"batch of {GLOBAL_BATCH}: the same optimizer steps in every set-up. Two processes "
        "run under `torchrun --standalone --nproc_per_node 2` (gloo). Seeds change the "
        f"batch order. The machine has {cores} cores, shared with other work while "
        "measuring; the loop time is the slower rank's, the command time includes "
        "starting Python, torch and the data in every process.",
        "",
        *rows,
        "",
        f"Accuracy, 2 processes minus 1 process on all cores: "
        f"{100 * statistics.mean(gaps):+.2f} points on average (per seed "
        f"{', '.join(f'{100 * g:+.2f}' for g in gaps)}).",
    ])
    print(body)
    write_section("distributed", body, quick=args.quick)


if __name__ == "__main__":
    main()
