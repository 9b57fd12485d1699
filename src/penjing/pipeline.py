"""The Deep Compression pipeline: prune → fine-tune → share weights → train the centroids.

Storage (relative indices, codebooks, Huffman) is `penjing.codec.save`; this module leaves
the model with exactly the zeros and shared values that the codec then stores.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from penjing.analysis.budget import Budget, BudgetError, plan_budget
from penjing.analysis.intervals import (
    Interval,
    accuracy_interval,
    correct,
    paired_difference,
    verdict,
)
from penjing.analysis.sensitivity import sensitivity
from penjing.codec.container import load as codec_load
from penjing.codec.container import save as codec_save
from penjing.codec.relindex import check_index_bits
from penjing.core.parametrize import finalize_, select_layers
from penjing.errors import AccuracyGuardError
from penjing.prune.configs import MagnitudeConfig
from penjing.prune.masking.magnitude import check_sparsity
from penjing.prune.schedule import cuts, prune_rounds_
from penjing.quant.inplace import quantize_
from penjing.quant.sharing.kmeans import INITS, check_bits, kmeans_1d
from penjing.quant.sharing.shared import KMeansConfig
from penjing.train import evaluate, fit


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is compressed."""

    sparsity: float  # fraction of weights pruned
    bits: int  # codebook index width: 2^bits − 1 shared values plus the pruned zero
    index_bits: int  # width of the relative index (gap) before Huffman coding

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        check_bits(self.bits)
        check_index_bits(self.index_bits)


@dataclass(frozen=True)
class DeepCompression:
    """The whole recipe: per-layer plans and the training budget of each stage."""

    layers: dict[str, LayerPlan]
    prune_rounds: int = 3  # prune → fine-tune rounds on the way to the target sparsity
    finetune_epochs: int = 4  # per round
    finetune_lr: float = 5e-4
    init: str = "linear"  # k-means centroid initialisation: linear, density or forgy
    quant_epochs: int = 3  # training of the shared centroids
    quant_lr: float = 1e-4
    seed: int = 0  # seeds the fine-tuning runs and the forgy init's draw

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a Deep Compression recipe needs at least one layer plan")
        if self.init not in INITS:
            raise ValueError(f"unknown k-means init {self.init!r}; choose one of {INITS}")
        if self.prune_rounds < 1:
            raise ValueError(f"prune_rounds must be >= 1, got {self.prune_rounds}")
        for name in ("finetune_epochs", "quant_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def index_bits(self) -> dict[str, int]:
        """Gap width per weight tensor, as `penjing.codec.save` takes it."""
        return {f"{name}.weight": plan.index_bits for name, plan in self.layers.items()}


# The per-layer settings of the paper's tables (Han et al. 2016, Tables 2 and 3); the paper
# reports 40× (LeNet-300-100) and 39× (LeNet-5) with them.
PAPER_RECIPES: dict[str, DeepCompression] = {
    "lenet300": DeepCompression(
        layers={
            "fc1": LayerPlan(sparsity=0.92, bits=6, index_bits=5),
            "fc2": LayerPlan(sparsity=0.91, bits=6, index_bits=5),
            "fc3": LayerPlan(sparsity=0.74, bits=6, index_bits=5),
        }
    ),
    "lenet5": DeepCompression(
        layers={
            "conv1": LayerPlan(sparsity=0.34, bits=8, index_bits=5),
            "conv2": LayerPlan(sparsity=0.88, bits=8, index_bits=5),
            "fc1": LayerPlan(sparsity=0.92, bits=5, index_bits=4),
            "fc2": LayerPlan(sparsity=0.81, bits=5, index_bits=4),
        }
    ),
}


# penjing's defaults: pruned a little harder and with fewer bits than the paper, which the
# same training budget absorbs on the MNIST subset (bench/deep_compression.py measures both
# and a sweep beyond).
RECIPES: dict[str, DeepCompression] = {
    "lenet300": DeepCompression(
        layers={
            "fc1": LayerPlan(sparsity=0.94, bits=5, index_bits=5),
            "fc2": LayerPlan(sparsity=0.92, bits=5, index_bits=5),
            "fc3": LayerPlan(sparsity=0.75, bits=5, index_bits=5),
        }
    ),
    "lenet5": DeepCompression(
        layers={
            "conv1": LayerPlan(sparsity=0.34, bits=6, index_bits=5),
            "conv2": LayerPlan(sparsity=0.90, bits=6, index_bits=5),
            "fc1": LayerPlan(sparsity=0.95, bits=5, index_bits=5),
            "fc2": LayerPlan(sparsity=0.81, bits=5, index_bits=5),
        }
    ),
}


def recipe_from_plan(plan, *, index_bits: dict[str, int] | None = None,
                     **stages) -> DeepCompression:
    """A Deep Compression recipe from a `penjing.analysis.Plan` with bits (a bytes budget):
    the planned sparsity and bits per layer, `stages` for the training budget.

    `index_bits` defaults to 8 for every layer: the codec entropy-codes the gaps (or the
    dense codes, whichever is smaller), so a wide gap costs no more than its information.
    """
    if not plan.bits or set(plan.bits) != set(plan.layers):
        raise ValueError("the plan has no bits for some layers; plan with Budget(bytes=...) "
                         "and a bits table")
    index_bits = index_bits or {}
    layers = {
        name: LayerPlan(sparsity=c.sparsity, bits=c.bits, index_bits=index_bits.get(name, 8))
        for name, c in plan.layers.items()
    }
    return DeepCompression(layers=layers, **stages)


def share_biases_(model: nn.Module, bits: int | dict[str, int]) -> dict[str, int]:
    """Replace each Linear/Conv bias by its k-means centroids (2^bits values) in place.

    A bias is a few hundred floats, but stored raw it costs as much as thousands of pruned,
    shared weights; with few distinct values the codec stores it as a codebook and codes.
    `bits` is one width for all or {layer name: bits}; returns the distinct values per layer.
    """
    chosen = select_layers(model, list(bits) if isinstance(bits, dict) else None)
    widths = {}
    for name in chosen:
        b = bits[name] if isinstance(bits, dict) else bits
        widths[name] = check_bits(b, f"bias bits of {name!r}")
    done = {}
    for name, module in chosen.items():
        bias = getattr(module, "bias", None)
        if bias is None or bias.numel() == 0:
            continue
        with torch.no_grad():
            result = kmeans_1d(bias.detach(), 2 ** widths[name], init="linear")
            centroids = torch.from_numpy(result.centroids).to(bias.dtype)
            bias.copy_(centroids[torch.from_numpy(result.labels)].view_as(bias))
        done[name] = int(torch.unique(bias.detach()).numel())
    return done


@dataclass
class StageRecord:
    """Accuracy after each stage and the layer weights to plot, by stage name."""

    accuracy: dict[str, float] = field(default_factory=dict)
    weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def reseed_loader_(loader: Iterable, seed: int) -> bool:
    """Restart the shuffling of a DataLoader that draws from its own generator at `seed`;
    returns whether there was one to restart.

    `fit` seeds torch's global generator, but a loader built with `generator=` shuffles
    from that one, whose state depends on every epoch run before: a dense model trained
    in this process and one loaded from a cache would then fine-tune on different orders.
    """
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
        return True
    return False


def _snapshot(model: nn.Module, names: Iterable[str]) -> dict[str, np.ndarray]:
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().cpu().numpy().ravel().copy() for n in names}


def deep_compression_(
    model: nn.Module,
    train_loader: Iterable,
    recipe: DeepCompression,
    *,
    test_loader: Iterable | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> StageRecord:
    """Run pruning, fine-tuning, weight sharing and centroid training on `model` in place.

    On return the model is finalized: plain weights with exactly the recipe's zeros and at
    most 2^bits − 1 distinct non-zero values per layer, ready for `penjing.codec.save`.
    """
    names = list(select_layers(model, list(recipe.layers)))
    record = StageRecord()
    say = log or (lambda _msg: None)

    def checkpoint(stage: str) -> None:
        record.weights[stage] = _snapshot(model, names)
        if test_loader is not None:
            record.accuracy[stage] = evaluate(model, test_loader)
            say(f"{stage:<10} accuracy {record.accuracy[stage]:.4f}")

    checkpoint("dense")
    # every stage starts from the recipe's seed, whatever the loader saw before
    reseed_loader_(train_loader, recipe.seed)
    # the prune → fine-tune loop of the CLI's prune verb and a recipe's prune stage
    sparsity = MagnitudeConfig(sparsity={n: p.sparsity for n, p in recipe.layers.items()})
    prune_rounds_(model, cuts(sparsity, "iterative", recipe.prune_rounds), train_loader,
                  epochs=recipe.finetune_epochs, lr=recipe.finetune_lr, seed=recipe.seed,
                  progress=progress, desc="prune round")
    checkpoint("pruned")
    bits = {name: plan.bits for name, plan in recipe.layers.items()}
    quantize_(model, KMeansConfig(bits, recipe.init, seed=recipe.seed))
    checkpoint("shared")
    reseed_loader_(train_loader, recipe.seed + recipe.prune_rounds)
    fit(
        model,
        train_loader,
        epochs=recipe.quant_epochs,
        lr=recipe.quant_lr,
        seed=recipe.seed + recipe.prune_rounds,
        progress=progress,
        desc="train centroids",
    )
    finalize_(model)
    checkpoint("quantized")
    return record


# ---- to a size goal under an accuracy guard ---------------------------------------------

SWEEP_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)
SWEEP_BITS = (2, 3, 4, 5, 6, 8)
HEADER_BYTES = 256  # the .pjz header, tensor names and code tables, roughly; measured after


@dataclass
class SizeResult:
    """What `compress_to_size` chose, wrote and measured."""

    goal: float  # the asked ratio
    max_drop: float
    path: Path
    ratio: float  # of the file written
    original_bytes: int
    compressed_bytes: int
    recipe: DeepCompression
    plan_text: str
    baseline: Interval  # the input model on the test images
    accuracy: Interval  # the compressed one, loaded back from `path`
    change: Interval  # paired: compressed minus input, same images
    guard_drop: float  # on the guard images, what the guard checked
    tries: list[dict] = field(default_factory=list)

    @property
    def drop_verdict(self) -> str:
        """'met' when the drop's interval stays within max_drop, 'within noise' when it
        straddles it, 'missed' when all of it is above."""
        return verdict(self.change.negated(), at_most=self.max_drop)

    def format(self) -> str:
        lines = [self.plan_text, ""]
        for i, t in enumerate(self.tries, 1):
            lines.append(f"try {i}: weight budget {t['budget_bytes']:,} B -> {t['ratio']:.1f}×, "
                         f"guard drop {t['guard_drop']:+.4f}")
        lines += [
            "",
            f"size: {self.original_bytes:,} B -> {self.compressed_bytes:,} B = "
            f"{self.ratio:.1f}× (goal {self.goal:g}×: "
            f"{'met' if self.ratio >= self.goal else 'missed'}), written to {self.path}",
            f"test accuracy: input {self.baseline.format()}, compressed "
            f"{self.accuracy.format()} (95 % intervals, {self.accuracy.n:,} images)",
            f"change {self.change.format(points=True)}; drop within {100 * self.max_drop:g} "
            f"points: {self.drop_verdict}",
        ]
        return "\n".join(lines)


def compress_to_size(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    ratio: float,
    path: str | os.PathLike,
    *,
    max_drop: float,
    guard_loader: Iterable | None = None,
    stages: dict | None = None,
    tries: int = 4,
    sparsities: Iterable[float] = SWEEP_SPARSITIES,
    bits: Iterable[int] = SWEEP_BITS,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SizeResult:
    """Deep Compression of `model` to a .pjz at least `ratio` times smaller than its
    float32 tensors, within `max_drop` (a fraction) of its accuracy; `model` is untouched.

    Each layer is swept alone over sparsities and k-means bits on `guard_loader` (the
    test loader when None; better a held-out part of the training data), a byte budget
    is planned from the curves (`penjing.analysis.plan_budget`), and the pipeline runs
    with that plan. The file is measured; when it is larger than the goal, the budget
    shrinks by what was missed, and when it beats the goal but breaks the guard, the
    budget grows by the overshoot (backing off), and the pipeline runs again from the
    input model, up to `tries` times. The accuracy guard checks the drop on the guard
    images; a goal that cannot be reached within it is an AccuracyGuardError naming the
    best found, and nothing is left at `path`. `stages` overrides the recipe's training budget
    (prune_rounds, finetune_epochs, quant_epochs, seed, ...); `sparsities` and `bits` are
    the sweeps' points (fewer are faster, and the plan never goes past them).
    """
    say = log or (lambda _msg: None)
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1 (times smaller), got {ratio!r}")
    if max_drop is None or isinstance(max_drop, bool) or not max_drop >= 0:
        raise ValueError(f"max_drop must be a number >= 0 (0.01 is one accuracy point), got "
                         f"{max_drop!r}")
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    path = Path(path)
    guard_loader = guard_loader if guard_loader is not None else test_loader
    layers = list(select_layers(model))  # no Linear / Conv: UnsupportedLayerError
    planned = {f"{n}.weight" for n in layers}
    state = model.state_dict()
    original = sum(t.numel() * t.element_size() for t in state.values()
                   if t.is_floating_point())
    rest = sum(t.numel() * t.element_size() for k, t in state.items()
               if t.is_floating_point() and k not in planned)

    def guard(m: nn.Module) -> float:
        return evaluate(m, guard_loader)

    baseline_guard = guard(model)
    say(f"sensitivity of {len(layers)} layers to pruning and to k-means bits")
    work = copy.deepcopy(model)
    table = sensitivity(work, guard, ratios=list(sparsities))
    bits_table = sensitivity(work, guard, bits=list(bits))
    budget = original / ratio - rest - HEADER_BYTES
    if budget < 1:
        raise AccuracyGuardError(
            f"size={ratio:g}x allows {original / ratio:,.0f} B, but the tensors that are not "
            f"pruned or shared (biases, norms: {rest:,} B) and the file header (about "
            f"{HEADER_BYTES} B) take that already; ask for a smaller ratio"
        )
    tries_done: list[dict] = []
    written = None
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(tries):
            try:
                plan = plan_budget(table, Budget(bytes=int(budget)), bits=bits_table)
            except BudgetError as err:
                tries_done.append({"budget_bytes": int(budget), "error": str(err)})
                break
            recipe = recipe_from_plan(plan, **(stages or {}))
            candidate = copy.deepcopy(model)
            deep_compression_(candidate, train_loader, recipe, progress=progress)
            saved = codec_save(candidate, tmp, index_bits=recipe.index_bits)
            drop = baseline_guard - guard(candidate)
            tries_done.append({"budget_bytes": int(budget), "ratio": saved.ratio,
                               "bytes": saved.compressed_bytes, "guard_drop": drop})
            say(f"weight budget {int(budget):,} B: {saved.ratio:.1f}×, guard drop {drop:+.4f}")
            if saved.ratio < ratio:  # the plan's estimate was short: ask for less
                budget *= saved.ratio / ratio * 0.98
                continue
            if drop > max_drop:
                if saved.ratio > 1.02 * ratio:  # back off: spend the overshoot on accuracy
                    budget *= saved.ratio / ratio * 0.99
                    continue
                break
            os.replace(tmp, path)
            written = (plan, recipe, saved, drop)
            break
    finally:
        tmp.unlink(missing_ok=True)
    if written is None:
        kept = [t for t in tries_done if t.get("ratio", 0.0) >= ratio]
        if kept:  # the size was reached, the guard was not
            best = min(kept, key=lambda t: t["guard_drop"])
            raise AccuracyGuardError(
                f"size={ratio:g}x cannot be kept within a drop of {max_drop:g}: the best file "
                f"at the goal, {best['ratio']:.1f}×, lost {best['guard_drop']:.4f} on the guard "
                f"images ({len(tries_done)} tr{'y' if len(tries_done) == 1 else 'ies'}); allow "
                "a larger drop, more fine-tuning (stages) or a smaller ratio"
            )
        made = [t["ratio"] for t in tries_done if "ratio" in t]
        reasons = "; ".join(t["error"] for t in tries_done if "error" in t)
        best = (f"the best file was {max(made):.1f}× after {len(made)} "
                f"tr{'y' if len(made) == 1 else 'ies'}" if made else "no plan fits")
        raise AccuracyGuardError(
            f"size={ratio:g}x was not reached: {best}" + (f" ({reasons})" if reasons else "")
            + "; ask for a smaller ratio" + (", or raise tries" if made else "")
        )
    plan, recipe, saved, drop = written
    loaded = copy.deepcopy(model)
    loaded.load_state_dict(codec_load(path))
    before, after = correct(model, test_loader), correct(loaded, test_loader)
    return SizeResult(
        goal=ratio, max_drop=float(max_drop), path=path, ratio=saved.ratio,
        original_bytes=original, compressed_bytes=saved.compressed_bytes, recipe=recipe,
        plan_text=plan.format(), baseline=accuracy_interval(before),
        accuracy=accuracy_interval(after), change=paired_difference(before, after),
        guard_drop=drop, tries=tries_done,
    )
