"""What each recipe stage does to the model: one function per stage kind, each a thin
call of the library function its config is named after."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from penjing import codec, load, models, quant
from penjing import prune as pruning
from penjing.core import steps
from penjing.core.parametrize import PRUNABLE
from penjing.distill import distill_
from penjing.export import onnx, ort_accuracy, ort_latency
from penjing.layers import check_skip, chosen_layers
from penjing.prune import slimming_loss
from penjing.quant.linear.config import make_config
from penjing.quant.linear.fakequant import ActQuant, WeightQuant
from penjing.recipes import schema
from penjing.recipes.load import beside, find
from penjing.recipes.schema import RecipeError
from penjing.train import cross_entropy, fit


@dataclass
class Context:
    """What every stage may read: data, the model's factory, where files go."""

    recipe: schema.Recipe
    train: DataLoader
    test: DataLoader
    example: torch.Tensor  # a batch of test inputs, `latency_batch` long
    factory: Callable[[], nn.Module]  # a fresh model of the recipe's architecture
    num_classes: int
    out: Path
    base: Path  # the recipe's folder: relative paths in it start here
    progress: bool
    index: int = 0  # of the stage running
    # the model as stage i left it (-1: the input model), for distillation's teacher
    model_after: Callable[[int], nn.Module] = field(default=lambda i: None)  # type: ignore

    @property
    def seed(self) -> int:
        return self.recipe.seed + self.index

    def desc(self, what: str) -> str:
        return f"stages[{self.index}] {what}"

    def fit_options(self) -> dict[str, Any]:
        return {"seed": self.seed, "progress": self.progress}


@dataclass
class Outcome:
    """A stage's model and what it wants said: a short detail, and a file it wrote (the
    .pjz, the .onnx) whose measurements replace the model's."""

    model: nn.Module
    detail: str
    artefact: Path | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _fit(ctx: Context, model: nn.Module, cfg: schema._Fit, epochs: int, what: str) -> None:
    loss = slimming_loss(cfg.bn_l1) if cfg.bn_l1 else cross_entropy
    fit(model, ctx.train, epochs=epochs, lr=cfg.lr, optimizer=cfg.optimizer,
        schedule=cfg.lr_schedule, loss_fn=loss, desc=ctx.desc(what), **ctx.fit_options())


def train(ctx: Context, model: nn.Module, cfg: schema.Train | schema.Finetune) -> Outcome:
    _fit(ctx, model, cfg, cfg.epochs, cfg.stage)
    slim = f", bn_l1 {cfg.bn_l1:g}" if cfg.bn_l1 else ""
    return Outcome(model, f"{cfg.epochs} epochs, lr {cfg.lr:g}{slim}")


# --- prune ---------------------------------------------------------------------------


def zero_fraction(model: nn.Module) -> float:
    """Fraction of zeros over the weights of every Linear and Conv layer."""
    total = zeros = 0
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            w = m.weight.detach()
            total += w.numel()
            zeros += int((w == 0).sum())
    return zeros / max(total, 1)


def _calib(ctx: Context, images: int) -> list:
    """The first `images` training inputs, in whole batches: what layer-wise methods see."""
    return list(itertools.islice(ctx.train, -(-images // ctx.recipe.batch_size)))


def prune(ctx: Context, model: nn.Module, cfg) -> Outcome:
    """The stage's penjing.prune config, cut on its schedule by `pj.prune.prune_rounds_`
    (what the CLI's prune verb and the Deep Compression pipeline run too)."""
    check_skip(model, cfg.skip, f"stages[{ctx.index}] (prune).skip")
    config = cfg.config()
    if getattr(cfg, "criterion", None) == "taylor":
        batches = [b for b, _ in zip(ctx.train, range(cfg.taylor_batches), strict=False)]
        config = replace(config, criterion=pruning.taylor(batches))
    calib = _calib(ctx, cfg.calib_images) if getattr(cfg, "method", "magnitude") \
        != "magnitude" else None
    pruning.prune_rounds_(model, pruning.cuts(config, cfg.schedule, cfg.rounds), ctx.train,
                          example_inputs=ctx.example[:1], epochs=cfg.epochs, lr=cfg.lr,
                          bn_batches=cfg.bn_batches, seed=ctx.seed, progress=ctx.progress,
                          desc=ctx.desc("fine-tune"), calib=calib)
    amount = next((f"{k} {getattr(cfg, k)}" for k in ("ratio", "sparsity", "quality")
                   if getattr(cfg, k, None) is not None), f"{getattr(cfg, 'n', '')}:"
                  f"{getattr(cfg, 'm', '')}")
    if isinstance(getattr(cfg, "sparsity", None), dict):
        amount = "sparsity per layer"
    schedule = "" if cfg.schedule == "one-shot" else f", {cfg.schedule} ×{cfg.rounds}"
    extra = f", criterion {cfg.criterion}" if hasattr(cfg, "criterion") else ""
    if getattr(cfg, "method", "magnitude") != "magnitude":
        extra = f", {cfg.method} on {cfg.calib_images} training inputs"
    tuned = f", {cfg.epochs} epochs each" if cfg.epochs else ""
    zeros = zero_fraction(model)  # masks leave zeros; channel and head pruning leave none
    return Outcome(model, f"{cfg.structure} {amount}{extra}{schedule}{tuned}",
                   notes={"weight_sparsity": zeros} if zeros else {})


# --- distill ---------------------------------------------------------------------------


def _teacher(ctx: Context, cfg: schema.Distill) -> tuple[nn.Module, str]:
    if isinstance(cfg.teacher, int):
        if not 0 <= cfg.teacher < ctx.index:
            raise RecipeError(f"stages[{ctx.index}] (distill).teacher: stage {cfg.teacher} "
                              f"has not run before this one; give 0 to {ctx.index - 1} or "
                              "'dense'")
        return ctx.model_after(cfg.teacher), f"stages[{cfg.teacher}]"
    if cfg.teacher == "dense":
        kinds = [s.stage for s in ctx.recipe.stages[: ctx.index]]
        first = next((i for i, k in enumerate(kinds) if k in ("prune", "quantize")), len(kinds))
        return ctx.model_after(first - 1), "the dense model"
    with beside(ctx.base):
        teacher = models.build(cfg.teacher, ctx.num_classes, role="teacher")
    if cfg.teacher_weights is not None:
        teacher = load(find(ctx.base, cfg.teacher_weights), teacher)
    return teacher, cfg.teacher


def distill(ctx: Context, model: nn.Module, cfg: schema.Distill) -> Outcome:
    teacher, name = _teacher(ctx, cfg)
    distill_(teacher, model, ctx.train, epochs=cfg.epochs, lr=cfg.lr,
             temperature=cfg.temperature, alpha=cfg.alpha, soft=cfg.soft,
             hints=cfg.hints, hint_epochs=cfg.hint_epochs, optimizer=cfg.optimizer,
             **ctx.fit_options())
    return Outcome(model, f"from {name}, {cfg.epochs} epochs, T {cfg.temperature:g}, "
                          f"alpha {cfg.alpha:g}")


# --- quantize --------------------------------------------------------------------------


def _linear_config(cfg):
    """The QuantConfig of a ptq, qat or weight_only stage, built as the CLI builds it."""
    if isinstance(cfg, schema.QuantWeightOnly):
        shape = {"bits": cfg.bits, "act_bits": None, "group_size": cfg.group_size,
                 "granularity": "group" if cfg.group_size else "channel"}
    else:
        shape = {"granularity": cfg.granularity, "observer": cfg.observer,
                 "reduce_range": cfg.reduce_range, "learnable": getattr(cfg, "learnable", False)}
    return make_config(skip=cfg.skip, skip_first=cfg.skip_first, skip_last=cfg.skip_last,
                       layers=cfg.layers, weight_range=cfg.weight_range, **shape)


def quantize(ctx: Context, model: nn.Module, cfg) -> Outcome:
    check_skip(model, cfg.skip, f"stages[{ctx.index}] (quantize).skip")
    if isinstance(cfg, schema.QuantKMeans):
        config = quant.KMeansConfig(cfg.bits, cfg.init, chosen_layers(cfg.layers, cfg.skip),
                                    ctx.seed)
        quant.quantize_(model, config)
        fit(model, ctx.train, epochs=cfg.epochs, lr=cfg.lr, desc=ctx.desc("train centroids"),
            **ctx.fit_options())
        bits = "per layer" if isinstance(cfg.bits, dict) else f"{cfg.bits} bits"
        return Outcome(model, f"k-means {bits}, {cfg.init} init, {cfg.epochs} epochs")
    if isinstance(cfg, schema.QuantGPTQ | schema.QuantAWQ):
        quant.quantize_(model, cfg.config(), calib=_calib(ctx, cfg.calib_images))
        how = "AWQ" if isinstance(cfg, schema.QuantAWQ) else \
            "round-to-nearest" if cfg.rounding == "nearest" else "GPTQ"
        group = f", groups of {cfg.group_size}" if cfg.group_size else ""
        return Outcome(model, f"weights INT{cfg.bits}{group}, {how}")
    config = _linear_config(cfg)
    if isinstance(cfg, schema.QuantPTQ):  # and QAT: the images, in whole batches
        batches = -(-cfg.calib_images // ctx.recipe.batch_size)
    if isinstance(cfg, schema.QuantQAT):
        q = quant.qat(model, ctx.train, config, epochs=cfg.epochs, lr=cfg.lr,
                      calib_batches=batches, desc=ctx.desc("qat"), **ctx.fit_options())
        return Outcome(q, f"INT8 QAT, {cfg.observer}, {cfg.epochs} epochs")
    if isinstance(cfg, schema.QuantPTQ):
        q = quant.ptq(model, ctx.train, config, batches=batches)
        return Outcome(q, f"INT8 PTQ, {cfg.observer}, {cfg.calib_images} images")
    q = quant.ptq(model, None, config)
    group = f", groups of {cfg.group_size}" if cfg.group_size else ""
    return Outcome(q, f"weights INT{cfg.bits}{group}")


# --- encode / export -------------------------------------------------------------------


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, ActQuant | WeightQuant) for m in model.modules())


def encode(ctx: Context, model: nn.Module, cfg: schema.Encode) -> Outcome:
    """Write the .pjz and measure what comes back out of it: the accuracy of the stage is
    the accuracy of the file."""
    path = ctx.out / cfg.file
    report = codec.save(model, path, index_bits=cfg.index_bits)
    notes = {"ratio": report.ratio, "coding_saving": report.coding_saving,
             "original_bytes": report.original_bytes}
    detail = (f"{report.ratio:.1f}x of float32; entropy coding saved "
              f"{report.coding_saving:.0%} of fixed-width codes")
    if is_quantized(model):  # a .pjz holds the float values the quantized layers compute
        notes["measured"] = "in memory: a .pjz rebuilds the float model, not its quantizers"
        return Outcome(model, detail, path, notes)
    loaded = load(path, ctx.factory)
    return Outcome(loaded, detail, path, notes)


def export(ctx: Context, model: nn.Module, cfg: schema.Export) -> Outcome:
    """Write the ONNX file; with `check`, accuracy and latency are ONNX Runtime's."""
    path = ctx.out / cfg.file
    onnx(model, path, ctx.example[:1], opset=cfg.opset, dynamic_batch=cfg.dynamic_batch)
    kind = "QDQ INT8" if is_quantized(model) else "FP32"
    notes: dict[str, Any] = {"format": kind}
    if cfg.check:
        notes["ort_accuracy"] = ort_accuracy(path, ctx.test)
        example = ctx.example if cfg.dynamic_batch else ctx.example[:1]
        notes["ort_latency_ms"] = 1e3 * ort_latency(path, example.numpy())
    return Outcome(model, f"ONNX {kind}, opset {cfg.opset}", path, notes)


def step(ctx: Context, model: nn.Module, cfg: schema.StepStage) -> Outcome:
    """A registered step of one's own, run with the config its keys make."""
    model = steps.run(cfg.stage, model, cfg.model_extra or {})  # checked as validation did
    fields = ", ".join(f"{k} {v}" for k, v in (cfg.model_extra or {}).items())
    return Outcome(model, fields or steps.get(cfg.stage).help)


def runner(kind: str) -> Callable[[Context, nn.Module, Any], Outcome]:
    """What runs a stage of `kind`: a built-in stage, else a registered step."""
    return RUNNERS.get(kind, step)


RUNNERS: dict[str, Callable[[Context, nn.Module, Any], Outcome]] = {
    "train": train, "finetune": train, "prune": prune, "distill": distill,
    "quantize": quantize, "encode": encode, "export": export,
}

# stages that leave the model as it was: their model file is the one before them
KEEPS_MODEL = ("encode", "export")
