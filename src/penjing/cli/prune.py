"""`penjing prune` as one function: build or load a model, prune it, measure before and after.

The model is a penjing model by name ("vgg", "resnet20", ...) or the user's own as
"package.module:function" (a function that returns the nn.Module), with weights from a
safetensors file. Channel granularities (group, filter, channel, neuron) and "head" remove
channels or attention heads for real; mask granularities (nm, shape, kernel, stripe,
vector, block) zero groups of weights, and stripe/shape masks are then compacted so their
saving is real too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from penjing import data, models
from penjing.analysis.stats import count_macs, count_params, latency
from penjing.prune.compact import compact_
from penjing.prune.heads import HEAD_CRITERIA, heads_
from penjing.prune.magnitude import check_sparsity
from penjing.prune.masks import finalize_
from penjing.prune.nm import check_nm, nm_
from penjing.prune.patterns import PATTERNS, pattern_
from penjing.prune.structured import GRANULARITIES, channels_, check_ratio
from penjing.prune.surgery import save_pruned
from penjing.train import (
    evaluate,
    fit,
    load_checkpoint,
    recalibrate_bn_,
    save_checkpoint,
    seed_everything,
)

MASK_GRANULARITIES = ("nm", *PATTERNS)


@dataclass(frozen=True)
class Measure:
    """Size, cost and accuracy of a model, all measured in this run."""

    params: int
    nonzero_params: int
    macs: int
    nonzero_macs: int
    latency_ms: float
    accuracy: float | None


@dataclass(frozen=True)
class PruneSummary:
    """What `prune_command` did and measured."""

    model: str
    granularity: str
    detail: str
    before: Measure
    after: Measure
    saved_to: str | None = None
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        b, a = self.before, self.after
        rows = [
            ("params", f"{b.params:,}", f"{a.params:,}", a.params / b.params),
            ("non-zero params", f"{b.nonzero_params:,}", f"{a.nonzero_params:,}",
             a.nonzero_params / b.nonzero_params),
            ("MACs / image", f"{b.macs:,}", f"{a.macs:,}", a.macs / b.macs),
            ("non-zero MACs", f"{b.nonzero_macs:,}", f"{a.nonzero_macs:,}",
             a.nonzero_macs / b.nonzero_macs),
            ("eager latency ms", f"{b.latency_ms:.3f}", f"{a.latency_ms:.3f}",
             a.latency_ms / b.latency_ms),
        ]
        if b.accuracy is not None and a.accuracy is not None:
            rows.append(("test accuracy", f"{b.accuracy:.4f}", f"{a.accuracy:.4f}",
                         a.accuracy / max(b.accuracy, 1e-12)))
        lines = [f"{self.model}: {self.granularity} pruning, {self.detail}",
                 f"{'':<18} {'before':>14} {'after':>14} {'after/before':>13}"]
        lines += [f"{name:<18} {x:>14} {y:>14} {r:>13.3f}" for name, x, y, r in rows]
        lines += self.notes
        if self.saved_to:
            lines.append(f"pruned model written to {self.saved_to}")
        return "\n".join(lines)


def _measure(model: nn.Module, x: torch.Tensor, test, repeats: int) -> Measure:
    one = x[:1]
    return Measure(
        params=count_params(model), nonzero_params=count_params(model, nonzero=True),
        macs=count_macs(model, one), nonzero_macs=count_macs(model, one, nonzero=True),
        latency_ms=1e3 * latency(model, x, repeats=repeats),
        accuracy=None if test is None else evaluate(model, test),
    )


def _check_options(granularity: str, ratio: float | None, criterion: str | None,
                   nm: str) -> tuple[int, int]:
    known = [*sorted(GRANULARITIES), "head", *MASK_GRANULARITIES]
    if granularity not in known:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {known}")
    if granularity == "head" and criterion not in (None, *HEAD_CRITERIA):
        raise ValueError(f"criterion {criterion!r} cannot score attention heads; choose one "
                         f"of {list(HEAD_CRITERIA)}")
    if granularity in MASK_GRANULARITIES and criterion not in (None, "l2"):
        raise ValueError(f"criterion {criterion!r} applies to channel granularities "
                         f"{sorted(GRANULARITIES)}; {granularity} masks go by group norm")
    if granularity == "nm" and ratio is not None:
        raise ValueError("nm keeps n of every m weights; give --nm N:M instead of --ratio")
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError as err:
        raise ValueError(f"--nm must look like 2:4, got {nm!r}") from err
    # checked here, not minutes later when training is done and the pruning starts
    if granularity == "nm":
        check_nm(n, m)
    elif granularity in MASK_GRANULARITIES and ratio is not None:
        check_sparsity(ratio, "ratio")
    elif granularity in GRANULARITIES and ratio is not None:
        check_ratio(ratio)
    return n, m


def prune_command(
    model: str,
    *,
    granularity: str = "group",
    ratio: float | None = None,
    criterion: str | None = None,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, ...] | None = None,
    dataset: str | None = "mnist",
    train_epochs: int = 0,
    finetune_epochs: int = 0,
    bn_batches: int = 20,
    global_ranking: bool = False,
    round_to: int = 1,
    ignored_layers: tuple[str, ...] = (),
    nm: str = "2:4",
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    repeats: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> PruneSummary:
    """Prune `model` and measure params, MACs, eager latency (and accuracy) before and after.

    `ratio` is the fraction of channels to remove (channel granularities) or of weight
    groups to zero (mask granularities), 0.5 by default. With `dataset` (a bundled data
    set or "package.module:function" returning a DataSplit) the model can train first
    (`train_epochs`, when no `weights`), be scored by "taylor", fine-tune after pruning and
    report test accuracy, and every BatchNorm re-measures its statistics on `bn_batches`
    training batches after pruning (0: keep the old ones); `dataset=None` measures
    size and speed only, on inputs of `input_shape` (default: the data set's image shape).
    The pruned model is written to `out` as safetensors (channel changes in its metadata,
    see `penjing.prune.load_pruned`; masks baked into the weights; after head pruning the
    state_dict of the model with its HeadAttention layers).
    """
    n, m = _check_options(granularity, ratio, criterion, nm)
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        raise ValueError(f"bn_batches must be an int >= 0 (0 keeps the BatchNorm statistics), "
                         f"got {bn_batches!r}")
    ratio = 0.5 if ratio is None else ratio
    seed_everything(seed)
    split = data.load(dataset) if dataset else None
    train = test = None
    if split is not None:
        train, test = data.loaders(split, batch_size=64, seed=seed)
    net = models.build(model, split.num_classes if split else None)
    if weights is not None:
        load_checkpoint(weights, net)
    elif train_epochs:
        if train is None:
            raise ValueError("train_epochs needs a dataset to train on")
        fit(net, train, epochs=train_epochs, progress=progress, desc="train")
    shape = input_shape or ((batch_size, *split.image_shape) if split else None)
    if shape is None:
        raise ValueError("without a dataset give input_shape, e.g. (32, 3, 224, 224)")
    x = torch.randn(*shape)
    net.eval()
    before = _measure(net, x, test, repeats)
    notes: list[str] = []
    changes = None
    if granularity in GRANULARITIES:
        score = criterion or "l1"
        if score == "taylor":
            if train is None:
                raise ValueError("criterion 'taylor' needs a dataset for its gradients")
            from penjing.prune.criteria import taylor

            batches = [batch for batch, _ in zip(train, range(4), strict=False)]
            score = taylor(batches)
        changes = channels_(net, x[:1], ratio=ratio, criterion=score, granularity=granularity,
                            global_ranking=global_ranking, round_to=round_to,
                            ignored_layers=ignored_layers)
        detail = f"ratio {ratio}, criterion {criterion or 'l1'}"
    elif granularity == "head":
        kept = heads_(net, ratio, criterion=criterion or "l1")
        detail = (f"ratio {ratio} of the heads of {len(kept)} attention layers, criterion "
                  f"{criterion or 'l1'}")
    elif granularity == "nm":
        done = nm_(net, n, m)
        detail = f"{n}:{m} on {len(done)} layers"
    else:
        done = pattern_(net, granularity, sparsity=ratio)
        detail = f"sparsity {ratio} of {granularity} groups on {len(done)} layers"
    if train is not None and bn_batches and recalibrate_bn_(net, train, bn_batches):
        notes.append(f"BatchNorm statistics re-measured on {bn_batches} training batches "
                     "after pruning (--bn-batches 0 keeps the old ones)")
    if finetune_epochs:
        if train is None:
            raise ValueError("finetune_epochs needs a dataset to train on")
        # cosine from 1e-3: a pruned network needs a full learning rate to recover, and
        # ends on a small one (bench/structured.py measures it against a constant rate)
        fit(net, train, epochs=finetune_epochs, progress=progress, desc="fine-tune",
            schedule="cosine")
    finalize_(net)
    saved_to = None
    if out is not None:
        if changes is not None:
            save_pruned(net, changes, out)
        else:
            save_checkpoint(net, out)
        saved_to = str(out)
    if granularity in ("stripe", "shape"):
        compacted = compact_(net)
        notes.append(f"{len(compacted)} convs re-expressed without their pruned "
                     f"{granularity}s (penjing.prune.compact_)")
    elif granularity in MASK_GRANULARITIES:
        notes.append("masks zero weights but a dense runtime still multiplies them: see "
                     "the non-zero rows")
    net.eval()
    after = _measure(net, x, test, repeats)
    return PruneSummary(model, granularity, detail, before, after, saved_to, notes)
