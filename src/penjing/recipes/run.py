"""Run a recipe: build the model and data, run the stages in order, measure after each,
save each stage's model, and resume from the last finished stage.

Files in the output folder:
    stages/NN-KIND.safetensors  the model after stage NN (penjing.save; penjing.load reads it)
    state.json                  the recipe's stage hashes and the rows of finished stages
    metrics.json, report.md, *.png  the report (see penjing.recipes.report)
    model.pjz, model.onnx       what encode and export stages write

A stage runs again when it or anything before it in the recipe changed (the hash of a
stage covers the model, weights, data, seed, the stages up to it, and an epoch cap).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from penjing import data, distributed, load, models, save
from penjing.core.counting import count_macs, count_params, latency_spread
from penjing.core.modes import eval_mode
from penjing.core.parametrize import PRUNABLE
from penjing.errors import PenjingError
from penjing.io import atomic_write_bytes, check_writable, parse_json
from penjing.quant.linear.fakequant import ActQuant, get_weight_quant
from penjing.recipes import stages as stage_fns
from penjing.recipes.load import beside, find
from penjing.recipes.load import load as load_recipe
from penjing.recipes.report import format_table, write_report
from penjing.recipes.schema import Recipe, RecipeError
from penjing.spec import import_object
from penjing.train import evaluate, seed_everything

EPOCHS_ENV = "PENJING_EPOCHS"  # caps every stage's epochs (CI, smoke runs): PENJING_EPOCHS=1
STATE_FORMAT = "penjing.compress/1"
HIST_BINS = 60
HIST_LAYERS = 8  # the largest layers get a weight histogram per stage


@dataclass
class StageResult:
    """One row of the report: the model after a stage (or the input model), measured."""

    index: int | None  # None: the input model, before any stage
    stage: str  # "input", "train", "prune", ...
    detail: str
    metric: float
    params: int
    nonzero_params: int
    macs: int  # per image
    bytes: int  # on disk: the stage's model file, or the .pjz / .onnx it wrote
    latency_ms: float  # one forward pass of `latency_batch` images, eager (ONNX Runtime
    # for an export stage that checks)
    seconds: float  # wall time of the stage
    file: str | None = None  # relative to the output folder
    resumed: bool = False  # finished by an earlier run
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "input" if self.index is None else f"{self.index}:{self.stage}"


@dataclass
class CompressResult:
    """What `run` did and measured; `format()` is the terminal table."""

    name: str  # the recipe's file stem
    out_dir: Path
    metric: str
    latency_batch: int
    rows: list[StageResult]
    ran: list[int]  # indices of the stages this call ran
    seconds: float
    epochs_cap: int | None = None
    messages: list[str] = field(default_factory=list)  # resume decisions, notes

    def format(self) -> str:
        return format_table(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.name, "metric": self.metric, "latency_batch": self.latency_batch,
            "epochs_cap": self.epochs_cap, "seconds": round(self.seconds, 3), "ran": self.ran,
            "stages": [asdict(r) for r in self.rows],
        }


def epochs_cap() -> int | None:
    """The cap PENJING_EPOCHS sets on every stage's epochs, or None."""
    text = os.environ.get(EPOCHS_ENV, "").strip()
    if not text:
        return None
    try:
        cap = int(text)
    except ValueError:
        cap = -1
    if cap < 0:
        raise ValueError(f"{EPOCHS_ENV} must be an integer >= 0 (epochs per stage at most), "
                         f"got {text!r}")
    return cap


def capped(recipe: Recipe, cap: int | None) -> Recipe:
    """`recipe` with every epochs field at most `cap`."""
    if cap is None:
        return recipe
    stages = []
    for stage in recipe.stages:
        update = {k: min(getattr(stage, k), cap) for k in ("epochs", "hint_epochs")
                  if hasattr(stage, k)}
        stages.append(stage.model_copy(update=update))
    return recipe.model_copy(update={"stages": stages})


def is_main() -> bool:
    """Whether this process writes files: rank 0 under torchrun, or a lone process. Under
    torchrun the process group is joined first, so that every rank knows its rank before
    the first stage."""
    distributed.init()
    return distributed.is_main()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_hashes(recipe: Recipe, base: Path, cap: int | None) -> tuple[str, list[str]]:
    """(hash of what the input model depends on, one cumulative hash per stage)."""
    head = recipe.model_dump(mode="json", exclude={"stages"})
    if recipe.weights is not None:
        with contextlib.suppress(OSError):
            head["weights_sha256"] = _digest(find(base, recipe.weights))
    head["epochs_cap"] = cap
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    first = h.hexdigest()
    out = []
    for stage in recipe.stages:
        h.update(json.dumps(stage.model_dump(mode="json"), sort_keys=True).encode())
        out.append(h.copy().hexdigest())
    return first, out


def _resolve(recipe_or_path: Recipe | str | os.PathLike) -> tuple[Recipe, Path, str]:
    if isinstance(recipe_or_path, Recipe):
        return recipe_or_path, Path.cwd(), "recipe"
    path = Path(recipe_or_path)
    return load_recipe(path), path.resolve().parent, path.stem


def _metric_fn(spec: str) -> Callable[[nn.Module, Any], float]:
    if spec == "accuracy":
        return evaluate
    if ":" not in spec:
        raise RecipeError(f"metric: unknown metric {spec!r}; give 'accuracy' or "
                          "'package.module:function' taking (model, test_loader) -> float")

    fn = import_object(spec, "metric")
    if not callable(fn):
        raise RecipeError(f"metric {spec!r} must name a function (model, test_loader) -> float")

    def metric(model: nn.Module, loader: Any) -> float:
        value = fn(model, loader)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"metric {spec!r} returned {type(value).__name__}, not a number")
        return float(value)

    return metric


def _build(recipe: Recipe, base: Path, num_classes: int) -> tuple[Callable[[], nn.Module],
                                                                     nn.Module]:
    """(a factory of fresh models, the input model with its weights): every error here
    names the recipe key it comes from."""
    def factory() -> nn.Module:
        with beside(base):
            try:
                return models.build(recipe.model, num_classes)
            except (PenjingError, ValueError, TypeError) as err:
                raise RecipeError(f"model: {err}") from err
            except Exception as err:  # the user's own function failed: say whose it is
                raise RecipeError(f"model: {recipe.model!r} raised {type(err).__name__}: "
                                  f"{err}") from err

    model = factory()
    if recipe.weights is not None:
        try:
            model = load(find(base, recipe.weights), model)
        except (OSError, PenjingError, ValueError) as err:
            raise RecipeError(f"weights: {err}") from err
    return factory, model


def _check_fit(model: nn.Module, x: torch.Tensor, num_classes: int, recipe: Recipe) -> None:
    """Run one batch: a model and data that do not go together fail now, not after the
    first stage trained for minutes."""
    shape = tuple(x.shape)
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x)
    except Exception as err:  # any failure of the user's forward: say which pair
        raise RecipeError(f"data: model {recipe.model!r} cannot run on the inputs of data "
                          f"{recipe.data!r} (shape {shape}): {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300]}") from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (shape[0], num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RecipeError(f"data: model {recipe.model!r} gives {got} on a batch of "
                          f"{shape[0]} from data {recipe.data!r}, but the data has "
                          f"{num_classes} classes; expected ({shape[0]}, {num_classes}) logits")


def histograms(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per layer (the HIST_LAYERS largest Linear / Conv layers): a histogram of the
    non-zero weights and the fraction kept."""
    layers = [(n, m.weight.detach().float().flatten()) for n, m in model.named_modules()
              if isinstance(m, PRUNABLE) and hasattr(m, "weight")]
    layers = sorted(layers, key=lambda t: -t[1].numel())[:HIST_LAYERS]
    out = {}
    for name, w in layers:
        alive = w[w != 0]
        lo, hi = (float(alive.min()), float(alive.max())) if alive.numel() else (-1.0, 1.0)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.histc(alive, HIST_BINS, lo, hi) if alive.numel() else torch.zeros(
            HIST_BINS)
        out[name] = {"lo": lo, "hi": hi, "counts": [int(c) for c in counts],
                     "kept": alive.numel() / max(w.numel(), 1), "size": w.numel()}
    return out


def measure(model: nn.Module, ctx: stage_fns.Context, metric: Callable, *, index: int | None,
            stage: str, detail: str, seconds: float, file: Path | None,
            outcome: stage_fns.Outcome | None = None) -> StageResult:

    notes = dict(outcome.notes) if outcome else {}
    size_of = outcome.artefact if outcome and outcome.artefact else file
    seconds_per_pass, spread = latency_spread(model, ctx.example)
    lat = 1e3 * seconds_per_pass
    notes["latency_spread"] = spread
    if any(isinstance(m, ActQuant) or get_weight_quant(m) is not None
           for m in model.modules()):
        # fake quantization computes in float and adds rounding: slower than float, and not
        # the speed of the integer kernels an exported file runs on
        notes["latency_simulated"] = True
    value = metric(model, ctx.test)
    if "ort_accuracy" in notes and ctx.recipe.metric == "accuracy":
        notes["eager_accuracy"], value = value, notes["ort_accuracy"]
    if "ort_latency_ms" in notes:
        notes["eager_latency_ms"], lat = lat, notes["ort_latency_ms"]
        notes.pop("latency_simulated", None)
        notes.pop("latency_spread", None)
    return StageResult(
        index=index, stage=stage, detail=detail, metric=value,
        params=count_params(model), nonzero_params=count_params(model, nonzero=True),
        macs=count_macs(model, ctx.example[:1]),
        bytes=size_of.stat().st_size if size_of is not None and size_of.exists() else 0,
        latency_ms=lat, seconds=seconds,
        file=None if size_of is None else os.path.relpath(size_of, ctx.out), notes=notes,
    )


def _read_state(path: Path) -> dict:
    try:
        state = parse_json(path.read_bytes(), "state.json")
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return {}
    return state


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _row(data: dict) -> StageResult:
    return StageResult(**{**data, "resumed": True})


def _start(state: dict, first: str, hashes: list[str], out: Path, recipe: Recipe,
           messages: list[str]) -> int:
    """The first stage to run, and why (in `messages`)."""
    if not state:
        return 0
    if state.get("input_hash") != first:
        messages.append("the model, weights, data, seed or epoch cap changed since the last "
                        "run: running every stage again")
        return 0
    done = state.get("stages", [])
    for i, h in enumerate(hashes):
        if i >= len(done):
            break
        entry = done[i]
        if entry.get("hash") != h:
            messages.append(f"stages[{i}] ({recipe.stages[i].stage}) changed since the last "
                            f"run: running it and the stages after it again")
            return i
        model_file = entry.get("model_file")
        if model_file and not (out / model_file).is_file():
            messages.append(f"{model_file} is gone: running stages[{i}] again")
            return i
    start = min(len(done), len(hashes))
    if start == len(hashes):
        messages.append(f"all {start} stages finished in an earlier run; nothing to run "
                        "(`penjing compress --restart` or run(..., resume=False) runs them again)")
    elif start:
        messages.append(f"resuming after stages[{start - 1}] ({recipe.stages[start - 1].stage})"
                        f": {start} of {len(hashes)} stages finished in an earlier run")
    return start


def run(
    recipe_or_path: Recipe | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    report: bool = True,
    log: Callable[[str], None] | None = print,
) -> CompressResult:
    """Run a recipe's stages in order and write the report to `out_dir`.

    `recipe_or_path`: a YAML file (relative paths and 'module:function' names in it are
    looked up beside it first) or a `Recipe`. Everything is checked before the first
    stage: the recipe, the model function, the weights, the data, one forward pass.
    After each stage the model is measured (metric, params, MACs, bytes, latency), saved
    as `stages/NN-KIND.safetensors` and recorded in `state.json`; a metrics line goes to
    `log`. With `resume`, stages an earlier run finished with the same recipe are not run
    again. Ctrl-C raises KeyboardInterrupt with a one-line message saying what is kept.
    `report=False` leaves out report.md and its plots (metrics.json is always written).
    """
    started = time.perf_counter()
    say = log or (lambda _msg: None)
    recipe, base, name = _resolve(recipe_or_path)
    cap = epochs_cap()
    recipe = capped(recipe, cap)
    out = Path(out_dir)
    writes = is_main()
    if not writes:  # under torchrun rank 0 alone prints and writes
        say = lambda _msg: None  # noqa: E731
    if writes:

        check_writable(out / "state.json", "output folder")

    seed_everything(recipe.seed)
    with beside(base):
        try:
            split = data.load(recipe.data)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"data: {err}") from err
        metric = _metric_fn(recipe.metric)
    factory, model = _build(recipe, base, split.num_classes)
    train, test = data.loaders(split, batch_size=recipe.batch_size, seed=recipe.seed)
    example = split.test.tensors[0][: recipe.latency_batch].clone()
    _check_fit(model, split.test.tensors[0][:2], split.num_classes, recipe)

    first_hash, hashes = stage_hashes(recipe, base, cap)
    state = _read_state(out / "state.json") if resume else {}
    messages: list[str] = []
    start = _start(state, first_hash, hashes, out, recipe, messages)
    for m in messages:
        say(m)
    done = state.get("stages", [])[:start] if start else []

    ctx = stage_fns.Context(recipe=recipe, train=train, test=test, example=example,
                            factory=factory, num_classes=split.num_classes, out=out,
                            base=base, progress=progress)

    def model_file_after(i: int) -> str | None:
        """The model file stage i left (None: the input model)."""
        while i >= 0:
            entry = done[i]
            if entry.get("model_file"):
                return entry["model_file"]
            i -= 1
        return None

    def model_after(i: int) -> nn.Module:
        path = model_file_after(i)
        if path is None:
            return _build(recipe, base, split.num_classes)[1]

        return load(out / path, factory)

    ctx.model_after = model_after
    if start and state.get("input"):
        rows = [_row(state["input"])]
    else:
        rows = [measure(model, ctx, metric, index=None, stage="input",
                        detail=recipe.model + (f" + {recipe.weights}" if recipe.weights else ""),
                        seconds=0.0, file=None)]
        rows[0].notes["histograms"] = histograms(model)
    rows += [_row(entry["row"]) for entry in done]
    if start:
        model = model_after(start - 1)

    def write_state() -> None:
        if writes:
            _write_json(out / "state.json", {
                "format": STATE_FORMAT, "input_hash": first_hash,
                "input": asdict(rows[0]) | {"resumed": False}, "stages": done,
            })

    ran = []
    for i in range(start, len(recipe.stages)):
        cfg = recipe.stages[i]
        ctx.index = i
        t0 = time.perf_counter()
        try:
            if writes or cfg.stage not in stage_fns.KEEPS_MODEL:
                outcome = stage_fns.runner(cfg.stage)(ctx, model, cfg)
            else:  # only the main process writes the .pjz / .onnx files
                outcome = stage_fns.Outcome(model, "written by rank 0")
        except KeyboardInterrupt:
            kept = f"stages 0-{i - 1} are kept in {out}; " if i else ""
            raise KeyboardInterrupt(
                f"interrupted in stages[{i}] ({cfg.stage}); {kept}run again to resume "
                f"from stages[{i}]"
            ) from None
        seconds = time.perf_counter() - t0
        # encode and export leave the model as it was (encode measures the model read back
        # from its file); the next stage goes on from the model in memory
        keeps = cfg.stage in stage_fns.KEEPS_MODEL
        if not keeps:
            model = outcome.model
        file = None if keeps else out / "stages" / f"{i:02d}-{cfg.stage}.safetensors"
        if writes and file is not None:
            save(model, file, metadata={"recipe": name, "stage": f"{i}:{cfg.stage}"})
        row = measure(outcome.model, ctx, metric, index=i, stage=cfg.stage,
                      detail=outcome.detail, seconds=seconds, file=file, outcome=outcome)
        row.notes["histograms"] = histograms(outcome.model)
        rows.append(row)
        ran.append(i)
        done.append({"hash": hashes[i], "row": asdict(row),
                     "model_file": None if file is None else os.path.relpath(file, out)})
        write_state()
        say(metrics_line(row, recipe.metric))
    if not ran:
        write_state()
    result = CompressResult(name=name, out_dir=out, metric=recipe.metric,
                            latency_batch=recipe.latency_batch, rows=rows, ran=ran,
                            seconds=time.perf_counter() - started, epochs_cap=cap,
                            messages=messages)
    if writes:

        write_report(result, plots=report)
    return result


def metrics_line(row: StageResult, metric: str) -> str:
    """One line after a stage: what it did and what the model measures now."""
    value = f"{100 * row.metric:.2f} %" if metric == "accuracy" else f"{row.metric:.4g}"
    return (f"stages[{row.index}] {row.stage}: {row.detail} | {metric} {value}, "
            f"{row.nonzero_params:,} non-zero of {row.params:,} params, {row.macs:,} MACs, "
            f"{row.bytes:,} B, {row.latency_ms:.2f} ms, {row.seconds:.1f} s")
