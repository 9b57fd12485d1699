"""How long penjing's own tools take (graph + prune of large models, rANS decoding, 1-D
k-means against scikit-learn, the command line's help), and how fast a model with half its
channels removed runs against its MACs.

Writes the `speed` section of BENCHMARKS.md. Run on a quiet machine:
`.venv/bin/python bench/speed.py` (`--quick`: small sizes, prints only). Ratios against
scikit-learn are medians of rounds that alternate the two tools, so both see the same load.
The torchvision rows of graph + prune run in `.venv-zoo` (`make zoo` builds it: torchvision
has no wheel for the project's CPU torch) when this interpreter has no torchvision.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, alternating, alternating_medians, torch_threads, write_section
from sensitivity import coder_section

from penjing.quant import kmeans_1d

KMEANS_TARGETS = {32: 100, 256: 30}  # scikit-learn's time / ours, same stopping rule
PRUNE_TARGET_S = 5.0  # graph + prune of regnet_y_128gf
HELP_TARGET_S = 1.0


def kmeans_section(n: int, rounds: int) -> tuple[list[str], list[str]]:
    from sklearn.cluster import KMeans

    values = (np.random.default_rng(0).standard_normal(n) * 0.05).astype(np.float32)
    lines = [
        "### 1-D k-means against scikit-learn",
        "",
        f"{n:,} float32 values (normal). scikit-learn's KMeans with n_init=1, tol=1e-4, "
        "max_iter=300 from the same linear start; penjing's `kmeans_1d` with the same "
        "stopping rule (and, apart, with its default tol=1e-7, up to 3,000 iterations). "
        f"Median seconds of {rounds} round(s) that alternate the two; inertia = sum of squared "
        f"distances to the centroid; {torch.get_num_threads()} threads each.",
        "",
        "| k | method | seconds | iterations | inertia | scikit-learn / ours |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    column = values.reshape(-1, 1)
    for k in KMEANS_TARGETS:
        init = np.linspace(values.min(), values.max(), k).reshape(-1, 1)
        found: dict[str, object] = {}

        def sk(k=k, init=init, found=found):
            t = time.perf_counter()
            found["sk"] = KMeans(k, init=init, n_init=1, tol=1e-4, max_iter=300).fit(column)
            return time.perf_counter() - t

        def ours(k=k, found=found, **kwargs):
            t = time.perf_counter()
            found[str(kwargs)] = kmeans_1d(values, k, init="linear", **kwargs)
            return time.perf_counter() - t

        same = {"tol": 1e-4, "max_iter": 300}
        sk_times, ours_times, default_times = alternating(
            [sk, lambda same=same: ours(**same), ours], rounds)
        sk_s = statistics.median(sk_times)
        km = found["sk"]
        lines.append(f"| {k} | scikit-learn | {sk_s:.3f} | {km.n_iter_} | {km.inertia_:.4g} "
                     "| 1.0 |")
        for label, times, key in (("penjing, same tol", ours_times, str(same)),
                                  ("penjing, default", default_times, "{}")):
            r = found[key]
            residual = values.astype(np.float64) - r.centroids[r.labels]
            ratio = sk_s / statistics.median(times)
            lines.append(f"| {k} | {label} | {statistics.median(times):.3f} | {r.iterations} "
                         f"| {float(residual @ residual):.4g} | **{ratio:.0f}×** |")
            if label == "penjing, same tol":
                target = KMEANS_TARGETS[k]
                verdicts.append(f"1-D k-means of {n:,} values, k = {k}: {ratio:.0f}× "
                                f"scikit-learn's speed, target ≥ {target}×: "
                                f"{'met' if ratio >= target else '**missed**'}")
    return lines, verdicts


def help_section(repeats: int) -> tuple[list[str], list[str]]:
    penjing = Path(sys.executable).with_name("penjing")
    lines = ["### The command line's help", "",
             f"Wall time of a fresh process, median of {repeats}.", "",
             "| command | seconds |", "|---|---|"]
    verdicts = []
    for args in (["-h"], ["--version"], ["prune", "-h"]):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([str(penjing), *args], capture_output=True, check=True)
            times.append(time.perf_counter() - t)
        seconds = statistics.median(times)
        lines.append(f"| `penjing {' '.join(args)}` | {seconds:.2f} |")
        if args == ["-h"]:
            verdicts.append(f"`penjing -h` in {seconds:.2f} s, target < {HELP_TARGET_S:g} s: "
                            f"{'met' if seconds < HELP_TARGET_S else '**missed**'}")
    return lines, verdicts


def gmlp_like(width: int = 128, tokens: int = 196, depth: int = 30) -> torch.nn.Module:
    """A gMLP-shaped network (timm's gmlp_ti16_224: 30 blocks, width 128, 196 tokens):
    channel projections around a spatial gating unit that splits the channels in two and
    mixes tokens with a Linear across them."""
    from torch import nn

    class Gate(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.norm = nn.LayerNorm(dim // 2)
            self.proj = nn.Linear(tokens, tokens)

        def forward(self, x):
            u, v = x.chunk(2, dim=-1)
            v = self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2)
            return u * v

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, 6 * width)
            self.gate = Gate(6 * width)
            self.fc2 = nn.Linear(3 * width, width)

        def forward(self, x):
            return x + self.fc2(self.gate(torch.nn.functional.gelu(self.fc1(self.norm(x)))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 16, stride=16)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, 1000)

        def forward(self, x):
            x = self.stem(x).flatten(2).transpose(1, 2)
            return self.head(self.norm(self.blocks(x)).mean(1))

    torch.manual_seed(0)
    return Net().eval()


def prune_seconds(model: torch.nn.Module, x: torch.Tensor, head: list[str], rounds: int) -> float:
    from penjing.prune import channels_

    times = []
    for _ in range(rounds):
        work = copy.deepcopy(model)
        t = time.perf_counter()
        channels_(work, x, ratio=0.5, ignored_layers=head)
        times.append(time.perf_counter() - t)
        del work
    return statistics.median(times)


def prune_rows(rounds: int, quick: bool) -> list[tuple[str, float, float]]:
    """(model, M params, median seconds) of graph + prune; torchvision's models where it
    is installed."""
    x = torch.randn(1, 3, 224, 224)
    cases = [("gMLP-shaped, 30 blocks", gmlp_like, ["head"])]
    with contextlib.suppress(ImportError):
        import torchvision

        for name in ["resnet50"] if quick else ["resnet50", "regnet_y_128gf"]:
            cases.append((f"torchvision {name}",
                          lambda name=name: torchvision.models.get_model(name).eval(), ["fc"]))
    rows = []
    for label, build, head in cases:
        model = build()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((label, params, prune_seconds(model, x, head, rounds)))
        print(f"{label}: {rows[-1][2]:.2f} s", file=sys.stderr, flush=True)
        del model
    return rows


def prune_section(rounds: int, quick: bool) -> tuple[list[str], list[str]]:
    """Graph + prune times; where this interpreter has no torchvision, `.venv-zoo` (made by
    `make zoo`, which has it) measures them."""
    where = f"torch {torch.__version__}"
    zoo = ROOT / ".venv-zoo" / "bin" / "python"
    if importlib.util.find_spec("torchvision") is not None or not zoo.exists():
        rows = prune_rows(rounds, quick)
    else:
        args = [str(zoo), str(Path(__file__)), "--prune-rows", str(rounds)]
        done = subprocess.run(args + (["--quick"] if quick else []), check=True,
                              capture_output=True, text=True)
        found = json.loads(done.stdout.strip().splitlines()[-1])
        rows, where = [tuple(r) for r in found["rows"]], found["where"]
    lines = ["### Graph + prune", "",
             "Wall time of `penjing.prune.channels_(model, x, ratio=0.5, ignored_layers=head)` "
             "(tracing, grouping, L1 scores, cutting 50 % of every group in place, checking "
             f"the pruned model), batch 1 at 224×224, random weights; median of {rounds}, the "
             f"model copy not counted; {where}.", "",
             "| model | M params | seconds |", "|---|---|---|"]
    verdicts = []
    for label, params, seconds in rows:
        lines.append(f"| {label} | {params:.1f} | {seconds:.2f} |")
        if "regnet_y_128gf" in label:
            verdicts.append(f"graph + prune of regnet_y_128gf in {seconds:.1f} s, target ≤ "
                            f"{PRUNE_TARGET_S:g} s: "
                            f"{'met' if seconds <= PRUNE_TARGET_S else '**missed**'}")
    if not any("torchvision" in r[0] for r in rows):
        lines.append("| torchvision models | – | not measured: no torchvision here and no "
                     "`.venv-zoo` (`make zoo` builds it) |")
    return lines, verdicts


PRUNED_MODELS = ("vgg", "resnet20", "mobilenetv2")
PRUNED_SLACK = 0.05  # target: latency ratio <= MACs ratio + this


def _forms(dense: torch.nn.Module, small: torch.nn.Module) -> dict[str, tuple]:
    """The two models as they are, with BatchNorm folded, and folded in channels-last."""
    from penjing.quant.linear.fold import fold_bn_

    forms = {"eager": (dense, small)}
    folded = tuple(copy.deepcopy(m) for m in (dense, small))
    for m in folded:
        fold_bn_(m)
    forms["eager, BN folded"] = folded
    forms["eager, BN folded, channels-last"] = tuple(
        copy.deepcopy(m).to(memory_format=torch.channels_last) for m in folded)
    return forms


def conv_ratios(dense: torch.nn.Module, small: torch.nn.Module, x: torch.Tensor,
                repeats: int) -> list[tuple[str, int, float, float]]:
    """Per kind of convolution (weight shapes, input side, stride): how many, the MACs
    ratio and the latency ratio of the pruned one alone, on the inputs it gets in the
    model (BatchNorm folded)."""
    from penjing.core.counting import latency

    def inputs(model):
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0])))
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return seen

    kinds: dict[str, list] = {}
    for (a, xa), (b, xb) in zip(inputs(dense), inputs(small), strict=True):
        key = (f"{tuple(a.weight.shape)} → {tuple(b.weight.shape)}, {xa.shape[-1]}×"
               f"{xa.shape[-2]}, stride {a.stride[0]}")
        macs = b.weight.numel() / a.weight.numel()
        t = [latency(m, xi, warmup=2, repeats=repeats) for m, xi in ((a, xa), (b, xb))]
        entry = kinds.setdefault(key, [0, macs, 0.0, 0.0])
        entry[0] += 1
        entry[2] += t[0]
        entry[3] += t[1]
    return [(k, n, macs, small_s / dense_s) for k, (n, macs, dense_s, small_s) in kinds.items()]


def pruned_section(batches: tuple[int, ...], rounds: int, repeats: int
                   ) -> tuple[list[str], list[str]]:
    from penjing import models, prune
    from penjing.core.counting import count_macs, latency
    from penjing.export import onnx, ort_latency

    lines = [
        "### Half the channels removed: latency against MACs",
        "",
        "Every prunable group of the MNIST-sized models loses 50 % of its channels (L1, per "
        "layer). Latency ratio = pruned / dense, each the median of "
        f"{rounds} rounds that alternate the two, {repeats} runs a round, 1 thread (torch "
        "and ONNX Runtime, FP32); ONNX Runtime folds BatchNorm itself. Target: a ratio at "
        f"most the MACs ratio + {PRUNED_SLACK}.",
        "",
        "| model | batch | MACs ratio | form | dense ms | pruned ms | latency ratio | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts, breakdown = [], []
    with torch_threads(1), tempfile.TemporaryDirectory() as tmp:
        for name in PRUNED_MODELS:
            torch.manual_seed(0)
            dense = models.create(name).eval()
            x1 = torch.randn(1, 1, 28, 28)
            small = prune.channels(dense, x1, ratio=0.5).eval()
            macs = count_macs(small, x1) / count_macs(dense, x1)
            forms = _forms(dense, small)
            for batch in batches:
                x = torch.randn(batch, 1, 28, 28)
                timed = {}
                for form, pair in forms.items():
                    xx = (x.contiguous(memory_format=torch.channels_last)
                          if "channels-last" in form else x)
                    timed[form] = alternating_medians(
                        [lambda m=m, xx=xx: latency(m, xx, warmup=2, repeats=repeats)
                         for m in pair], rounds)
                paths = [onnx(m, Path(tmp) / f"{name}_{i}_{batch}.onnx", x)
                         for i, m in enumerate((dense, small))]
                timed["ONNX Runtime"] = alternating_medians(
                    [lambda p=p, x=x: ort_latency(p, x, threads=1, repeats=repeats,
                                                  warmup=3) for p in paths], rounds)
                for form, (a, b) in timed.items():
                    ok = b / a <= macs + PRUNED_SLACK
                    lines.append(f"| {name} | {batch} | {macs:.3f} | {form} | {1e3 * a:.2f} "
                                 f"| {1e3 * b:.2f} | **{b / a:.2f}** | "
                                 f"{'met' if ok else 'missed'} |")
                    print(lines[-1], flush=True)
                ratios = {f: b / a for f, (a, b) in timed.items()}
                eager = min((f for f in ratios if f.startswith("eager")), key=ratios.get)
                both = max(ratios[eager], ratios["ONNX Runtime"])
                verdicts.append(
                    f"{name} at half its channels, batch {batch}: eager "
                    f"{ratios[eager]:.2f} (best form: {eager}), ONNX Runtime "
                    f"{ratios['ONNX Runtime']:.2f}, target ≤ MACs {macs:.3f} + "
                    f"{PRUNED_SLACK} in both: "
                    f"{'met' if both <= macs + PRUNED_SLACK else '**missed**'}")
            if name == "resnet20":
                folded = forms["eager, BN folded"]
                breakdown = conv_ratios(*folded, torch.randn(32, 1, 28, 28), repeats)
    lines += ["", "Where ResNet-20's time goes (batch 32, BatchNorm folded): each kind of "
              "convolution timed alone, pruned against dense, on the inputs it gets in the "
              "model.", "",
              "| convolution (dense → pruned weight, input, stride) | count | MACs ratio "
              "| latency ratio |", "|---|---|---|---|"]
    lines += [f"| {k} | {n} | {m:.2f} | {r:.2f} |" for k, n, m, r in breakdown]
    return lines, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", default=None,
                        help="parts: prune coders kmeans help pruned (a partial run prints "
                             "only)")
    parser.add_argument("--prune-rows", type=int, metavar="ROUNDS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prune_rows:  # run by prune_section in .venv-zoo: one line of JSON
        rows = prune_rows(args.prune_rows, args.quick)
        print(json.dumps({"rows": rows, "where": f"torch {torch.__version__}, torchvision "
                          f"{__import__('torchvision').__version__} in .venv-zoo"}))
        return
    parts = args.only or ["prune", "coders", "kmeans", "help", "pruned"]
    os.chdir(ROOT)
    lines = ["## Speed: the tools, and pruned models against their MACs", ""]
    verdicts: list[str] = []
    if "prune" in parts:
        body, found = prune_section(1 if args.quick else 3, args.quick)
        lines += body + [""]
        verdicts += found
    if "coders" in parts:
        body = coder_section(args.quick)
        lines += body + [""]
    if "kmeans" in parts:
        body, found = kmeans_section(1_000_000 if args.quick else 10_000_000,
                                     1 if args.quick else 3)
        lines += body + [""]
        verdicts += found
    if "help" in parts:
        body, found = help_section(3 if args.quick else 5)
        lines += body + [""]
        verdicts += found
    if "pruned" in parts:
        body, found = pruned_section((1, 32), 3 if args.quick else 7, 5 if args.quick else 20)
        lines += body + [""]
        verdicts += found
    lines += ["### Targets", ""] + [f"- {v}." for v in verdicts]
    text = "\n".join(lines)
    print(text)
    write_section("speed", text, quick=args.quick or args.only is not None,
                  reproduce="`make bench-speed` (it builds `.venv-zoo`, where the torchvision "
                            "rows run)")


if __name__ == "__main__":
    main()
