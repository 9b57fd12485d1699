"""Fashion-MNIST, full test set, a ResNet-20: what INT8 and a 50× size target keep, with
95 % intervals and mean ± sd over seeds.

For each seed a ResNet-20 is trained on the 60,000 training images (the last
`--guard-images` of them held out for the accuracy guards), then:
- INT8 PTQ under the accuracy guard (`pj.quant.ptq_guarded`, `--max-drop` points);
- `compress_to_size` to `--size` times smaller (Deep Compression planned from per-layer
  sensitivity to pruning and k-means bits), under the same guard.
Every accuracy is on the 10,000 test images with its Wilson interval; every change is
paired (Newcombe) against the same seed's float model, and a "drop within N points"
counts as met only when its whole interval is. Writes the `fashion` section of
BENCHMARKS.md. Needs Debian's dataset-fashion-mnist (`make bench` installs it where it
can). `--quick` is a smoke run on a slice of the data that leaves BENCHMARKS.md alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_section
from torch.utils.data import DataLoader, Subset

import penjing as pj
from penjing.analysis.intervals import (
    accuracy_interval,
    correct,
    mean_sd,
    paired_difference,
    verdict,
)
from penjing.errors import AccuracyGuardError, MissingDependencyError
from penjing.models.resnet import ResNet
from penjing.pipeline import compress_to_size
from penjing.quant import int8, ptq_guarded
from penjing.train import evaluate, fit


def loaders(split, args, seed: int):
    train_set, test_set = split.train, split.test
    if args.quick:
        train_set = Subset(train_set, range(args.quick_train))
        test_set = Subset(test_set, range(args.quick_test))
    n = len(train_set)
    guard_idx = range(n - args.guard_images, n)
    fit_set = Subset(train_set, range(n - args.guard_images))
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(fit_set, batch_size=128, shuffle=True, generator=generator)
    guard = DataLoader(Subset(train_set, guard_idx), batch_size=500)
    test = DataLoader(test_set, batch_size=500)
    calib = [x for (x, _), _ in zip(DataLoader(fit_set, batch_size=64), range(8), strict=False)]
    return train, guard, test, calib


def one_seed(split, args, seed: int, workdir: Path) -> dict:
    train, guard, test, calib = loaders(split, args, seed)
    torch.manual_seed(seed)
    model = ResNet(depth=args.depth, width=args.width)
    started = time.perf_counter()
    fit(model, train, epochs=args.epochs, lr=2e-3, schedule="cosine", seed=seed,
        progress=False)
    model.eval()
    row = {"seed": seed, "train_s": time.perf_counter() - started}
    base = correct(model, test)
    row["float"] = accuracy_interval(base)
    print(f"seed {seed}: float {row['float']} after {row['train_s']:.0f} s", flush=True)

    guarded = ptq_guarded(model, calib, int8(), max_drop=args.max_drop / 100,
                          evaluate=lambda m: evaluate(m, guard))
    hits = correct(guarded.model, test)
    row["int8"] = accuracy_interval(hits)
    row["int8_change"] = paired_difference(base, hits)
    row["int8_float_layers"] = guarded.float_layers
    print(f"seed {seed}: INT8 {row['int8']}, kept float: {guarded.float_layers}", flush=True)

    stages = {"prune_rounds": args.rounds, "finetune_epochs": args.finetune_epochs,
              "quant_epochs": args.quant_epochs, "seed": seed}
    try:
        result = compress_to_size(model, train, test, args.size, workdir / f"s{seed}.pjz",
                                  max_drop=args.max_drop / 100, guard_loader=guard,
                                  stages=stages, progress=False, **args.sweeps)
        row["size"] = result
    except AccuracyGuardError as err:
        row["size_error"] = str(err)
    print(f"seed {seed}: size target " + (f"{row['size'].ratio:.1f}×" if "size" in row
                                         else row["size_error"]), flush=True)
    return row


def table(rows: list[dict], args) -> str:
    limit = args.max_drop / 100
    lines = [
        f"| seed | float (95 % interval) | INT8, guarded | INT8 change | layers kept float "
        f"| {args.size:g}× target: ratio | accuracy | change | drop ≤ {args.max_drop:g} pt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = r.get("size")
        size_cells = (
            f"{size.ratio:.1f}× | {size.accuracy.format()} | {size.change.format(points=True)} "
            f"| {size.drop_verdict}" if size else f"not reached | {r['size_error']} | | "
        )
        lines.append(
            f"| {r['seed']} | {r['float'].format()} | {r['int8'].format()} | "
            f"{r['int8_change'].format(points=True)} | "
            f"{', '.join(r['int8_float_layers']) or 'none'} | {size_cells} |"
        )
    floats = mean_sd([100 * r["float"].value for r in rows])
    int8s = mean_sd([100 * r["int8"].value for r in rows])
    summary = [
        "",
        f"Over {len(rows)} seeds: float {floats[0]:.2f} ± {floats[1]:.2f} %, INT8 (guarded) "
        f"{int8s[0]:.2f} ± {int8s[1]:.2f} %; INT8 drop within {args.max_drop:g} point: "
        + ", ".join(verdict(r["int8_change"].negated(), at_most=limit) for r in rows) + ".",
    ]
    sized = [r["size"] for r in rows if "size" in r]
    if sized:
        ratios = mean_sd([s.ratio for s in sized])
        accs = mean_sd([100 * s.accuracy.value for s in sized])
        summary.append(f"{args.size:g}× target: {ratios[0]:.1f} ± {ratios[1]:.1f}× at "
                       f"{accs[0]:.2f} ± {accs[1]:.2f} % over {len(sized)} seeds.")
    return "\n".join(lines + summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run on a slice of the data; BENCHMARKS.md left alone")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--depth", type=int, default=20, help="6n + 2")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=float, default=50.0)
    parser.add_argument("--max-drop", type=float, default=1.0, help="points")
    parser.add_argument("--guard-images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--quant-epochs", type=int, default=1)
    parser.add_argument("--quick-train", type=int, default=1500)
    parser.add_argument("--quick-test", type=int, default=500)
    args = parser.parse_args()
    args.sweeps = {}
    if args.quick:  # a ResNet-8 on a slice, coarse sweeps, a goal it can reach
        args.seeds, args.epochs, args.depth, args.width, args.size = 2, 2, 8, 0.5, 8.0
        args.guard_images, args.rounds, args.finetune_epochs = 200, 1, 1
        args.sweeps = {"sparsities": (0.5, 0.8, 0.9), "bits": (3, 5)}
    try:
        split = pj.data.fashion_mnist()
    except MissingDependencyError as err:
        print(f"bench/fashion.py skipped: {err}")
        sys.exit(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_seed(split, args, seed, Path(tmp)) for seed in range(args.seeds)]
    body = table(rows, args)
    test_images = args.quick_test if args.quick else len(split.test)
    head = (
        f"## Fashion-MNIST: ResNet-{args.depth}, INT8 and a {args.size:g}× size target\n\n"
        f"ResNet-{args.depth} (width {args.width:g}) trained {args.epochs} epochs (Adam, "
        f"cosine) per seed on the training images less {args.guard_images:,} held out for "
        f"the accuracy guards (max drop {args.max_drop:g} point); accuracy on "
        f"{test_images:,} test images with its 95 % Wilson interval, changes paired "
        "against the same seed's float model (Newcombe). A drop counts as met only when "
        f"its whole interval is within the limit. Whole run "
        f"{time.perf_counter() - started:.0f} s.\n\n"
    )
    print(head + body)
    write_section("fashion", head + body, quick=args.quick)


if __name__ == "__main__":
    main()
