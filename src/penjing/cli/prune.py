"""`penjing prune`: load a model, prune it, measure before and after, write the model file.

The model is a penjing model by name ("vgg", "resnet20", ...) or the user's own as
"package.module:function" (a function that returns the nn.Module), with weights from any
model file penjing reads. Channel granularities (group, filter, channel, neuron) and "head" remove
channels or attention heads for real; mask granularities (nm, shape, kernel, stripe,
vector, block) zero groups of weights, and stripe/shape masks are then compacted so their
saving is real too.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from penjing import layers
from penjing.cli import common
from penjing.core.counting import count_macs, count_params, latency
from penjing.core.parametrize import finalize_
from penjing.prune.configs import (
    STRUCTURES,
    ChannelConfig,
    HeadConfig,
    MagnitudeConfig,
    NMConfig,
    PatternConfig,
    by_method,
    config_for,
)
from penjing.prune.masking.compact import compact_
from penjing.prune.schedule import SCHEDULES, cuts, prune_rounds_
from penjing.prune.structural.criteria import taylor
from penjing.train import evaluate, has_batchnorm, seed_everything


@dataclass(frozen=True)
class Measure:
    """Size, cost and accuracy of a model, all measured in this run."""

    params: int
    nonzero_params: int
    macs: int
    nonzero_macs: int
    latency_ms: float  # median of one eager forward pass over the batch
    latency_spread: float  # interquartile range of those timings over their median
    accuracy: float | None


@dataclass(frozen=True)
class PruneSummary:
    """What `prune_command` did and measured."""

    model: str
    structure: str
    detail: str
    before: Measure
    after: Measure
    saved_to: str | None = None
    notes: list[str] = field(default_factory=list)

    batch: int = 1

    def format(self) -> str:
        b, a = self.before, self.after
        rows = [
            ("params", f"{b.params:,}", f"{a.params:,}", f"{a.params / b.params:.3f}"),
            ("non-zero params", f"{b.nonzero_params:,}", f"{a.nonzero_params:,}",
             f"{a.nonzero_params / b.nonzero_params:.3f}"),
            ("MACs / image", f"{b.macs:,}", f"{a.macs:,}", f"{a.macs / b.macs:.3f}"),
            ("non-zero MACs", f"{b.nonzero_macs:,}", f"{a.nonzero_macs:,}",
             f"{a.nonzero_macs / b.nonzero_macs:.3f}"),
            (f"latency ms, batch {self.batch}", f"{b.latency_ms:.3f} ±{b.latency_spread / 2:.0%}",
             f"{a.latency_ms:.3f} ±{a.latency_spread / 2:.0%}",
             f"{a.latency_ms / b.latency_ms:.3f}"),
        ]
        if b.accuracy is not None and a.accuracy is not None:
            rows.append(("test accuracy", f"{b.accuracy:.2%}", f"{a.accuracy:.2%}",
                         f"{100 * (a.accuracy - b.accuracy):+.2f} pts"))
        lines = [f"{self.model}: {self.structure} pruning, {self.detail}",
                 f"{'':<22} {'before':>14} {'after':>14} {'change':>13}"]
        lines += [f"{name:<22} {x:>14} {y:>14} {r:>13}" for name, x, y, r in rows]
        lines.append("latency: median of eager PyTorch passes, ± half the interquartile range")
        warning = common.spread_warning(max(b.latency_spread, a.latency_spread))
        if warning:
            lines.append(warning + " (--latency-batch)")
        lines += self.notes
        if self.saved_to:
            lines.append(f"pruned model written to {self.saved_to}")
        return "\n".join(lines)


def _latency(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of one forward pass on `x` and the interquartile range of the
    `repeats` timings over that median."""
    latency(model, x, repeats=1)  # its warm-up passes
    return common.spread([latency(model, x, warmup=0, repeats=1)
                          for _ in range(max(repeats, 2))])


def _measure(model: nn.Module, x: torch.Tensor, test, repeats: int) -> Measure:
    one = x[:1]
    seconds, spread = _latency(model, x, repeats)
    return Measure(
        params=count_params(model), nonzero_params=count_params(model, nonzero=True),
        macs=count_macs(model, one), nonzero_macs=count_macs(model, one, nonzero=True),
        latency_ms=1e3 * seconds, latency_spread=spread,
        accuracy=None if test is None else evaluate(model, test),
    )


def _config(structure: str, ratio: float | None, sparsity: float | None,
            criterion: str | None, nm: str, global_ranking: bool, round_to: int):
    """The prune config the flags describe, checked as a recipe's prune stage is (the
    same words for the same mistake)."""
    fields: dict = {"ratio": ratio, "sparsity": sparsity, "criterion": criterion}
    if structure == "nm":
        try:
            fields["n"], fields["m"] = (int(v) for v in nm.split(":"))
        except ValueError as err:
            raise ValueError(f"--nm must look like 2:4, got {nm!r}") from err
    cls = STRUCTURES.get(structure)
    if cls is ChannelConfig:
        fields |= {"global_ranking": global_ranking, "round_to": round_to}
    elif sparsity is None and ratio is not None and cls in (MagnitudeConfig, PatternConfig):
        raise ValueError(f"{structure} pruning zeroes a fraction of weights: give --sparsity "
                         "(--ratio is the fraction of channels or heads to remove)")
    elif cls in (MagnitudeConfig, PatternConfig) and sparsity is None:
        fields["sparsity"] = 0.5
    if cls in (ChannelConfig, HeadConfig) and ratio is None:
        fields["ratio"] = 0.5
    return config_for(structure, **{k: v for k, v in fields.items() if v is not None})


def _layerwise(config, method: str):
    """The magnitude config `config` as SparseGPT or Wanda would prune the same amount."""
    if method != "magnitude" and not isinstance(config, MagnitudeConfig | NMConfig):
        raise ValueError(f"--method {method} prunes single weights or N:M; give --structure "
                         "weight or nm")
    return by_method(config, method)


def prune_command(
    model: str,
    *,
    structure: str = "group",
    ratio: float | None = None,
    sparsity: float | None = None,
    criterion: str | None = None,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, ...] | None = None,
    dataset: str | None = "mnist",
    epochs: int = 0,
    lr: float = 1e-3,
    bn_batches: int = 20,
    global_ranking: bool = False,
    round_to: int = 1,
    skip: tuple[str, ...] = (),
    nm: str = "2:4",
    schedule: str = "one-shot",
    rounds: int = 1,
    method: str = "magnitude",
    calib_images: int = 256,
    out: str | os.PathLike | None = None,
    batch_size: int | None = None,
    latency_batch: int = 32,
    repeats: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> PruneSummary:
    """Prune `model` and measure params, MACs, eager latency (and accuracy) before and after.

    `structure` is what goes (penjing.prune.STRUCTURES): single weights, N:M, a pattern, a
    channel structure or heads. `ratio` is the fraction of channels or heads to remove,
    `sparsity` the fraction of weights (or weight groups) to zero, 0.5 by default,
    reached in `rounds` cuts on `schedule` (penjing.prune.cuts), each followed by the
    fine-tuning. With
    `dataset` (a bundled data set or "package.module:function" returning a DataSplit) the
    model can be scored by "taylor", fine-tuned for `epochs` after pruning and report test
    accuracy, and every BatchNorm re-measures its statistics on `bn_batches` training
    batches after pruning (0: keep the old ones); `dataset=None` measures size and speed
    only, on inputs of `input_shape` (default: the data set's image shape, batch
    `latency_batch`); `batch_size` (64 when None) is the batch of the fine-tuning, the
    BatchNorm re-measuring and the calibration. Layers whose names fully match a `skip`
    regex keep their channels (or weights). The pruned model is written to `out` as a
    penjing model file (`penjing.load` rebuilds it; masks stay live).
    """
    # checked here, not minutes later when training is done and the pruning starts
    config = _layerwise(_config(structure, ratio, sparsity, criterion, nm, global_ranking,
                                round_to), method)
    cuts(config, schedule, rounds)  # a schedule that cannot cut this config says so now
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"bn_batches must be an int >= 0 (0 keeps the BatchNorm statistics), "
                         f"got {bn_batches!r}")
    seed_everything(seed)
    split, train, test = common.load_data(dataset, batch_size or 64, seed)
    net = common.load_model(model, weights, split.num_classes if split else None)
    x = common.example_input(split, input_shape, latency_batch)
    net.eval()
    before = _measure(net, x, test, repeats)
    notes: list[str] = []
    ignored = common.skipped(net, list(skip))
    if ignored:
        config = replace(config, layers=~layers.names(*ignored))
    if getattr(config, "criterion", None) == "taylor":
        if train is None:
            raise ValueError("criterion 'taylor' needs a dataset for its gradients")
        batches = [batch for batch, _ in zip(train, range(4), strict=False)]
        config = replace(config, criterion=taylor(batches))
    if train is None and epochs:
        raise ValueError("fine-tuning (epochs) needs a dataset to train on")
    epochs = common.epochs(epochs)
    bn = bn_batches if train is not None and has_batchnorm(net) else 0
    # cosine from lr: a pruned network needs a full learning rate to recover, and ends
    # on a small one (bench/structured.py measures it against a constant rate)
    calib = None
    if method != "magnitude":
        if train is None:
            raise ValueError(f"--method {method} measures every layer on training inputs; "
                             "give --data")
        calib = list(itertools.islice(train, -(-calib_images // (batch_size or 64))))
    done = prune_rounds_(net, cuts(config, schedule, rounds), train, example_inputs=x[:1],
                         epochs=epochs, lr=lr, lr_schedule="cosine", bn_batches=bn,
                         seed=seed, progress=progress, calib=calib)[-1]
    detail = _detail(structure, config, done, criterion)
    if schedule != "one-shot":
        detail += f", {schedule} ×{rounds}"
    if method != "magnitude":
        detail += f", {method} on {calib_images} training inputs"
    trains = train is not None and bool(epochs or bn or calib or criterion == "taylor")
    if batch_size is not None and not trains:
        notes.append(f"batch size {batch_size} was not used: it is the fine-tuning batch, as "
                     "in every verb, and nothing was trained here; the latency batch is "
                     "--latency-batch")
    if bn:
        notes.append(f"BatchNorm statistics re-measured on {bn_batches} training batches "
                     "after pruning (--bn-batches 0 keeps the old ones)")
    if epochs:
        notes.append(f"fine-tuned {epochs} epochs (Adam from lr {lr}, cosine to 0)"
                     + (" after each cut" if rounds > 1 else ""))
    if structure in ("stripe", "shape"):
        finalize_(net)
        compacted = compact_(net)
        notes.append(f"{len(compacted)} convs re-expressed without their pruned "
                     f"{structure}s (penjing.prune.compact_)")
    elif not isinstance(config, ChannelConfig | HeadConfig):
        notes.append("masks zero weights but a dense runtime still multiplies them: see "
                     "the non-zero rows")
    saved_to = None
    if out is not None:
        common.save_model(net, out, model)
        saved_to = str(out)
    measured = copy.deepcopy(net)
    finalize_(measured)  # what a runtime executes: no parametrization in the way
    after = _measure(measured.eval(), x, test, repeats)
    return PruneSummary(model, structure, detail, before, after, saved_to, notes,
                        batch=x.shape[0])


def _detail(structure: str, config, done, criterion: str | None) -> str:
    """One line on what was pruned, for the summary's title."""
    if isinstance(config, ChannelConfig):
        return f"ratio {config.ratio}, criterion {criterion or 'l1'}"
    if isinstance(config, HeadConfig):
        return (f"ratio {config.ratio} of the heads of {len(done)} attention layers, "
                f"criterion {config.criterion}")
    if getattr(config, "n", None) is not None:
        return f"{config.n}:{config.m} on {len(done)} layers"
    return f"sparsity {config.sparsity} of {structure} groups on {len(done)} layers"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "prune", formatter_class=common.HelpFormatter,
        help="structured pruning: remove channels for real, or N:M / shape / stripe / "
        "block masks; params, MACs, latency and accuracy before and after",
        description="Prune MODEL (from --weights) and write the result with --out. "
        "group/filter/channel/neuron remove channels physically and head removes attention "
        "heads; nm, shape, kernel, stripe, vector, block zero groups of weights (shape and "
        "stripe are then re-expressed so the saving is real; the other masks stay on the "
        "weights, so later verbs keep the zeros).",
    )
    common.add_model(parser)
    common.add_weights(parser)
    parser.add_argument(
        "--structure", "--granularity", default="group", choices=list(STRUCTURES),
        help="what goes: single weights, N:M, a pattern (shape, kernel, stripe, vector, "
        "block), channels scored by group/filter/channel/neuron, or attention heads",
    )
    parser.add_argument("--ratio", type=float,
                        help="fraction of channels or heads to remove (default 0.5)")
    parser.add_argument("--sparsity", type=float,
                        help="fraction of weights (weight) or weight groups (patterns) to "
                        "zero (default 0.5)")
    parser.add_argument("--criterion", choices=["l1", "l2", "bn", "taylor", "random"],
                        help="channel importance (default l1)")
    parser.add_argument("--global-ranking", action="store_true",
                        help="rank channels across the network instead of per layer")
    parser.add_argument("--round-to", type=int, default=1,
                        help="keep channel counts multiples of this (8, 16, 64)")
    common.add_skip(parser, "whose output channels (or weights) stay")
    parser.add_argument("--nm", default="2:4", help="N:M for --structure nm")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="one-shot",
                        help="iterative: --rounds cuts of the same share of what is left; "
                        "agp: a cubic ramp; each cut is followed by --epochs of fine-tuning")
    parser.add_argument("--rounds", type=int, default=1, help="cuts, with --schedule")
    parser.add_argument("--method", choices=["magnitude", "sparsegpt", "wanda"],
                        default="magnitude",
                        help="which weights go (--structure weight or nm): the smallest, or "
                        "by what each layer sees on --calib-images training inputs")
    parser.add_argument("--calib-images", type=int, default=256,
                        help="training inputs SparseGPT and Wanda measure each layer on")
    common.add_data(parser, allow_none=True)
    parser.add_argument("--input-shape", type=common.shape,
                        help="e.g. 32,3,224,224 (default: --latency-batch images of --data)")
    parser.add_argument("--epochs", type=int, default=0,
                        help="fine-tune after pruning (Adam from --lr, cosine schedule to 0)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int,
                        help="training images per step of the fine-tuning, the BatchNorm "
                        "re-measuring and the SparseGPT / Wanda calibration (default 64)")
    parser.add_argument("--latency-batch", type=int, default=32,
                        help="images per latency measurement (before 0.2 this was "
                        "--batch-size)")
    parser.add_argument("--bn-batches", type=int, default=20,
                        help="training batches to re-measure BatchNorm statistics on after "
                        "pruning (0 keeps the old statistics)")
    common.add_out(parser, "the pruned model file")
    common.add_run(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    summary = prune_command(
        args.model, structure=args.structure, ratio=args.ratio, sparsity=args.sparsity,
        criterion=args.criterion, weights=args.weights, input_shape=args.input_shape,
        dataset=args.data, epochs=args.epochs, lr=args.lr, bn_batches=args.bn_batches,
        global_ranking=args.global_ranking, round_to=args.round_to, skip=tuple(args.skip),
        nm=args.nm, schedule=args.schedule, rounds=args.rounds, method=args.method,
        calib_images=args.calib_images, out=args.out,
        batch_size=args.batch_size, latency_batch=args.latency_batch, seed=args.seed,
        progress=common.progress(args),
    )
    print(summary.format())
