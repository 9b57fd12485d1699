"""Every torchvision classifier through penjing's channel pruning and Torch-Pruning, side by side.

For each model of `torchvision.models.list_models(module=torchvision.models)` (random
weights, eval mode, one 224×224 image, 299×299 for Inception v3) both tools remove half the
channels of every prunable group (L1, per layer, the 1000-logit layers kept), and the
pruned model is checked: it builds, its eval output is (1, 1000), its parameter count, the
same call at ratio 0 gives bit-identical outputs, and a train-mode forward + backward on a
batch of 2 works (GoogLeNet / Inception v3 return their auxiliary outputs then). Every error
is caught per model and tool, so one failure never stops the run.

torchvision needs the torch it was built with, so this runs in its own environment:
`make zoo` builds `.venv-zoo` (pins in constraints-zoo.txt) and runs the full zoo, which
writes the `zoo` section of BENCHMARKS.md. A subset: `.venv-zoo/bin/python bench/zoo.py
--models 'resnet|vit'`; a smoke run: `--quick` (neither writes BENCHMARKS.md). A full run
records each model in runs/zoo.jsonl as it goes: `--resume` continues a stopped run and
`--report` writes the section from what it measured, listing the models it did not reach.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import re
import signal
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from common import ROOT, write_section
from torch import nn

import penjing as pj
from penjing.core.counting import count_params

RATIO = 0.5
QUICK = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
         "googlenet", "convnext_tiny", "vit_b_32", "swin_t")
# Targets set for penjing's structured pruning; measured and marked met / missed below.
PARAMS_TARGET = 0.9  # every model keeps less than this share of its parameters
WIDE_TARGET = 0.35  # ConvNeXt, Swin and ViT: their wide MLPs and embeddings must shrink
WIDE_FAMILIES = re.compile(r"^(convnext|swin|vit)_")
LARGEST_TARGET_S = 5.0  # graph + prune of the largest torchvision model
# One stuck step (a tracer that never finishes) must not stall the other 80 models.
STEP_LIMIT_S = 240
# Each model's outcome is appended here as it is measured, so `--resume` continues a run
# that was stopped part-way instead of starting over (a full zoo takes about an hour).
PROGRESS = ROOT / "runs" / "zoo.jsonl"
TOOLS = ("penjing", "Torch-Pruning")


class StepTimeout(Exception):
    """A tool spent more than STEP_LIMIT_S on one step of one model."""


@dataclass(frozen=True)
class Outcome:
    """What one tool did to one model; None where the check was never reached."""

    pruned: bool = False
    shape: bool | None = None  # eval output of the pruned model is (1, 1000)
    params: float | None = None  # pruned / original parameters
    identity: bool | None = None  # ratio 0 gives bit-identical eval outputs
    train: bool | None = None  # train-mode forward + backward on a batch of 2
    seconds: float | None = None  # graph + prune, the model copy excluded
    error: str = ""  # "stage: Type: first line" of the first failure

    @property
    def passed(self) -> bool:
        return self.pruned and bool(self.shape and self.identity and self.train)


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def _alarm(signum, frame):
    raise StepTimeout(f"step took more than {STEP_LIMIT_S} s")


def limited(fn, *args):
    """fn(*args), raising StepTimeout after STEP_LIMIT_S seconds."""
    signal.setitimer(signal.ITIMER_REAL, STEP_LIMIT_S)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GoogLeNet / Inception warn about init_weights
        return torchvision.models.get_model(name, weights=None).eval()


def example(name: str, batch: int) -> torch.Tensor:
    side = 299 if name == "inception_v3" else 224
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))


def heads(model: nn.Module) -> list[str]:
    """The layers producing the 1000 logits (SqueezeNet's is a 1×1 conv; aux heads too)."""
    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) and m.out_features == 1000)
            or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)]


def prune_penjing(model: nn.Module, x: torch.Tensor, ratio: float, head: list[str]) -> None:
    pj.prune.channels_(model, x, ratio=ratio, ignored_layers=head)


def prune_tp(model: nn.Module, x: torch.Tensor, ratio: float, head: list[str]) -> None:
    import torch_pruning as tp
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    from torchvision.models.vision_transformer import VisionTransformer

    # Attention widths must stay a multiple of the head count (Torch-Pruning's own recipe
    # for torchvision's ViT and for qkv projections).
    num_heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            num_heads[m] = m.num_heads
        elif isinstance(m, ShiftedWindowAttention):
            num_heads[m.qkv] = m.num_heads
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=[model.get_submodule(h) for h in head], global_pruning=False,
        num_heads=num_heads,
    )
    pruner.step()
    if isinstance(model, VisionTransformer):  # its forward reshapes by this attribute
        model.hidden_dim = model.conv_proj.out_channels


PRUNERS = {"penjing": prune_penjing, "Torch-Pruning": prune_tp}


def logits(out) -> list[torch.Tensor]:
    """Every logits tensor of an output: a tensor, or GoogLeNet / Inception's named tuples."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def train_step(model: nn.Module, name: str) -> bool:
    model.train()
    out = logits(model(example(name, 2)))
    target = torch.tensor([0, 1])
    loss = sum(F.cross_entropy(o, target) for o in out)
    loss.backward()
    return all(o.shape == (2, 1000) for o in out) and bool(torch.isfinite(loss))


def check(tool: str, name: str, original: nn.Module, reference: torch.Tensor,
          x: torch.Tensor) -> Outcome:
    """Prune a copy of `original` with `tool` and run every check; never raises."""
    prune, head = PRUNERS[tool], heads(original)
    found: dict = {}
    errors: list[str] = []

    def stage(what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - every failure is a figure of this benchmark
            errors.append(f"{what}: {describe(exc)}")
            return None

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(original)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            limited(prune, model, x, ratio, head)
        if ratio == RATIO:
            found["seconds"] = time.perf_counter() - start
        return model.eval()

    def forward(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return limited(model, x)

    model = stage("prune", pruned, RATIO)
    if model is not None:
        found["pruned"] = True
        found["params"] = count_params(model) / count_params(original)
        out = stage("eval forward", forward, model)
        found["shape"] = out is not None and tuple(out.shape) == (1, 1000)
        found["train"] = bool(stage("train step", limited, train_step, model, name))
        del model, out
    if any("StepTimeout" in e for e in errors):
        errors.append("ratio 0: not tried (a step timed out)")  # it would time out again
    else:
        found["identity"] = bool(stage("ratio 0",
                                       lambda: torch.equal(forward(pruned(0.0)), reference)))
    return Outcome(**found, error="; ".join(errors))


# Workers hold this lock while they measure a model above HUGE parameters, so two of the
# 100-650 M parameter models (several copies of up to 2.5 GB each) never share the memory.
HUGE = 100e6
_huge_lock = None


def _start_worker(lock, threads: int) -> None:
    global _huge_lock
    _huge_lock = lock
    torch.set_num_threads(threads)
    signal.signal(signal.SIGALRM, _alarm)


def measure(name: str, first: str, size_hint: float) -> tuple[str, int, dict[str, Outcome]]:
    """Both tools on one model, `first` first; runs in a worker process."""
    with _huge_lock if _huge_lock is not None and size_hint > HUGE else contextlib.nullcontext():
        original = build(name)
        x = example(name, 1)
        with torch.no_grad():
            reference = original(x)
        order = (first,) + tuple(t for t in TOOLS if t != first)
        outcomes = {t: check(t, name, original, reference, x) for t in order}
    return name, count_params(original), {t: outcomes[t] for t in TOOLS}


def size_hint(name: str) -> float:
    """Parameter count from torchvision's weight metadata (no download, no model built)."""
    weights = list(torchvision.models.get_model_weights(name))
    return float(weights[0].meta["num_params"]) if weights else 0.0


def run(names: list[str], progress: Path | None, resume: bool, jobs: int,
        measuring: bool = True) -> tuple[dict[str, int], dict[str, dict[str, Outcome]]]:
    """Measure every model in `jobs` worker processes, smallest first (a run stopped early
    has measured the most models); a full run appends each outcome to `progress` as it
    comes, so `--resume` can continue it."""
    sizes, results = {}, {}
    if progress is not None and resume and progress.exists():
        for line in progress.read_text().splitlines():
            row = json.loads(line)
            if row["model"] in names:
                sizes[row["model"]] = row["params"]
                results[row["model"]] = {t: Outcome(**row[t]) for t in TOOLS}
        print(f"resuming: {len(results)} models already measured in {progress}", flush=True)
    elif progress is not None:
        progress.parent.mkdir(exist_ok=True)
        progress.write_text("")
    todo = sorted((m for m in names if m not in results and measuring), key=size_hint)
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                             initargs=(context.Lock(), threads)) as pool:
        # Alternate which tool goes first so neither always meets a warmer machine.
        futures = [pool.submit(measure, m, TOOLS[names.index(m) % 2], size_hint(m))
                   for m in todo]
        for done, future in enumerate(as_completed(futures), len(results) + 1):
            try:
                name, sizes[name], results[name] = future.result()
            except BrokenProcessPool as exc:
                left = len(names) - len(results)
                raise SystemExit(f"a worker died (out of memory?) with {left} models left; "
                                 "`--resume` continues (`--jobs 1` needs the least memory)"
                                 ) from exc
            if progress is not None:
                with progress.open("a") as f:
                    f.write(json.dumps({"model": name, "params": sizes[name], **{
                        t: asdict(o) for t, o in results[name].items()}}) + "\n")
            cells = "  ".join(f"{t}: {cell(results[name][t])}" for t in TOOLS)
            print(f"[{done}/{len(names)}, {time.perf_counter() - start:.0f} s] {name} "
                  f"({sizes[name] / 1e6:.1f} M)  {cells}", flush=True)
            for t in TOOLS:
                if results[name][t].error:
                    print(f"    {t}: {results[name][t].error}", flush=True)
    return sizes, results


def mark(flag: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "–"}[flag]


def cell(o: Outcome) -> str:
    if not o.pruned:
        return "fails"
    return (f"{o.params:.2f}× out {mark(o.shape)} r0 {mark(o.identity)} "
            f"train {mark(o.train)} {o.seconds:.1f} s").replace("**", "")


def section(names: list[str], sizes: dict[str, int], results: dict[str, dict[str, Outcome]],
            jobs: int) -> str:
    """The zoo section; models in `names` without results are listed as not measured."""
    n, measured = len(names), [m for m in names if m in results]
    passed = {t: sum(results[m][t].passed for m in measured) for t in TOOLS}
    lines = [
        "## Structured pruning on every torchvision classifier",
        "",
        f"Every classifier of torchvision {torchvision.__version__} (random weights, eval mode, "
        "batch 1 at 224×224, Inception v3 at 299×299) loses "
        f"{RATIO:.0%} of the channels of every prunable group: L1 importance, per layer "
        "(no global ranking), the layers producing the 1000 logits kept. penjing: "
        "`pj.prune.channels_(model, x, ratio=0.5, ignored_layers=heads)`; Torch-Pruning "
        "(torch-pruning 1.6.1): `MetaPruner` with `MagnitudeImportance(p=1)`, "
        "`pruning_ratio=0.5`, `global_pruning=False`, the same ignored heads, `num_heads` "
        "for attention layers and `hidden_dim` reset on ViT as its torchvision example does. "
        f"{jobs} worker process(es) share the cores, smallest models first; both tools run on a "
        "model in the same worker, alternating which goes first. "
        "params = pruned / original; out = eval output is (1, 1000); r0 = ratio 0 gives "
        "bit-identical outputs; train = a train-mode forward + backward on a batch of 2; "
        "s = wall time of graph + prune (the model copy not counted; on a busy machine it "
        "includes waiting for a core).",
        "",
        f"**penjing passes every check on {passed['penjing']} of {n} models; Torch-Pruning on "
        f"{passed['Torch-Pruning']} of {n}.**",
        "",
        "| model | M params | penjing params | out | r0 | train | s "
        "| TP params | out | r0 | train | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        row = [m, f"{sizes[m] / 1e6:.1f}"]
        for t in TOOLS:
            o = results[m][t]
            row += ([f"{o.params:.2f}×", mark(o.shape), mark(o.identity), mark(o.train),
                     f"{o.seconds:.1f}"] if o.pruned else ["**fails**", "–", "–", "–", "–"])
        lines.append("| " + " | ".join(row) + " |")
    missing = [m for m in names if m not in results]
    if missing:
        lines += ["", f"Not measured (the run stopped before them, {len(missing)}): "
                  + ", ".join(missing) + "."]
    lines += ["", "### Targets", "",
              "| target | penjing | Torch-Pruning | penjing met |", "|---|---|---|---|"]
    for label, figures, met in targets(names, sizes, results):
        lines.append(f"| {label} | {figures['penjing']} | {figures['Torch-Pruning']} | "
                     f"{'met' if met else '**missed**'} |")
    failures = [(m, t, results[m][t].error) for m in measured for t in TOOLS
                if results[m][t].error]
    if failures:
        lines += ["", "### Failures (first line of each error)", "",
                  "| model | tool | stage: error |", "|---|---|---|"]
        lines += [f"| {m} | {t} | {e.replace('|', '/')} |" for m, t, e in failures]
    return "\n".join(lines)


def targets(names: list[str], sizes: dict[str, int], results: dict[str, dict[str, Outcome]]):
    """(label, figure per tool, whether penjing meets it) for each target of the zoo; a model
    not measured counts against every target it falls under."""
    rows = []
    passed = {t: sum(results[m][t].passed for m in names if m in results) for t in TOOLS}
    rows.append(("every classifier passes every check",
                 {t: f"{passed[t]} / {len(names)}" for t in TOOLS},
                 passed["penjing"] == len(names)))

    def worst(models: list[str], tool: str) -> tuple[float, int]:
        got = [results[m][tool].params if m in results else None for m in models]
        shown = [p for p in got if p is not None]
        return (max(shown) if shown else float("nan")), sum(p is None for p in got)

    for label, models, limit, strict in (
        (f"params < {PARAMS_TARGET}× on every model", names, PARAMS_TARGET, True),
        (f"ConvNeXt, Swin, ViT params ≤ {WIDE_TARGET}×",
         [m for m in names if WIDE_FAMILIES.match(m)], WIDE_TARGET, False),
    ):
        if not models:
            continue
        figures = {}
        for t in TOOLS:
            top, failed = worst(models, t)
            figures[t] = (f"worst {top:.2f}×"
                          + (f", {failed} failed or not measured" if failed else ""))
        top, failed = worst(models, "penjing")
        met = failed == 0 and (top < limit if strict else top <= limit)
        rows.append((label, figures, met))
    largest = max(names, key=lambda m: sizes.get(m, size_hint(m)))
    seconds = {t: results[largest][t].seconds if largest in results else None for t in TOOLS}
    rows.append((f"graph + prune of the largest model ({largest}, "
                 f"{sizes.get(largest, size_hint(largest)) / 1e6:.0f} M params) "
                 f"≤ {LARGEST_TARGET_S:.0f} s",
                 {t: f"{s:.1f} s" if s is not None else
                  ("fails" if largest in results else "not measured")
                  for t, s in seconds.items()},
                 seconds["penjing"] is not None and seconds["penjing"] <= LARGEST_TARGET_S))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="regex: run only the classifiers it matches")
    parser.add_argument("--quick", action="store_true",
                        help=f"a handful of models ({', '.join(QUICK)}); BENCHMARKS.md untouched")
    parser.add_argument("--resume", action="store_true",
                        help="full zoo only: keep the models a stopped run measured "
                        f"(in {PROGRESS.relative_to(ROOT)})")
    parser.add_argument("--report", action="store_true",
                        help="write the section from what a stopped full run measured, "
                        "without measuring (the rest is listed as not measured)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes, each with cores / jobs torch threads")
    args = parser.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    everything = torchvision.models.list_models(module=torchvision.models)
    names = [m for m in everything if m in QUICK] if args.quick else everything
    if args.models:
        names = [m for m in names if re.search(args.models, m)]
        if not names:
            raise SystemExit(f"--models {args.models!r} matches no classifier; the names are "
                             f"{', '.join(everything)}")
    print(f"{len(names)} models, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {args.jobs} workers", flush=True)
    full = names == everything
    if args.report and not (full and PROGRESS.exists()):
        raise SystemExit(f"--report writes what a full run left in {PROGRESS}; there is none "
                         "(or --models / --quick was given): run the zoo first")
    sizes, results = run(names, PROGRESS if full else None, args.resume or args.report,
                         args.jobs, measuring=not args.report)
    body = section(names, sizes, results, args.jobs)
    print(body, flush=True)
    # Only a run over the whole zoo is the reference figure.
    write_section("zoo", body, quick=not full, reproduce=(
        "`make zoo` (builds `.venv-zoo` with torch 2.14.1, torchvision 0.29.1, torch-pruning "
        "1.6.1 and penjing editable, pins in `constraints-zoo.txt`, then runs "
        "`.venv-zoo/bin/python bench/zoo.py`; `--resume` continues a stopped run)"))


if __name__ == "__main__":
    main()
