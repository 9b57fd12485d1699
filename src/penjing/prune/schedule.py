"""Pruning schedules: pure functions from a step to the sparsity to reach by then, the
configs of each cut, and the prune → fine-tune loop every caller runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from penjing.prune.configs import (
    ChannelConfig,
    MagnitudeConfig,
    NMConfig,
    PatternConfig,
    PruneConfig,
    prune_,
)
from penjing.prune.masking.layerwise import SparseGPTConfig, WandaConfig
from penjing.prune.masking.magnitude import check_sparsity
from penjing.train import fit, recalibrate_bn_


def iterative(final: float, rounds: int, initial: float = 0.0) -> list[float]:
    """Sparsities for `rounds` prune → fine-tune rounds ending at `final`.

    The kept fraction shrinks geometrically, so each round removes the same share of the
    weights still alive (the gentle schedule of Han et al.'s iterative pruning).
    """
    check_sparsity(final, "final sparsity")
    check_sparsity(initial, "initial sparsity")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    keep0, keep1 = 1.0 - initial, 1.0 - final
    return [1.0 - keep0 * (keep1 / keep0) ** ((i + 1) / rounds) for i in range(rounds)]


def agp(step: int, final: float, steps: int, initial: float = 0.0, start: int = 0) -> float:
    """Zhu & Gupta's automated gradual pruning: s_t = s_f + (s_i − s_f)(1 − (t − t0)/n)³."""
    check_sparsity(final, "final sparsity")
    check_sparsity(initial, "initial sparsity")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    progress = min(max((step - start) / steps, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


SCHEDULES = ("one-shot", "iterative", "agp")


def _relative(targets: list[float]) -> list[float]:
    """Cumulative fractions removed → the fraction of what is left that each cut removes
    (channels and heads are gone after a cut, so the next cut counts from what stays)."""
    out, before = [], 0.0
    for t in targets:
        out.append(max(0.0, 1.0 - (1.0 - t) / (1.0 - before)))
        before = t
    return out


def cuts(config: PruneConfig, schedule: str = "one-shot", rounds: int = 1) -> list[PruneConfig]:
    """The config of each cut that reaches `config`'s amount in `rounds` cuts.

    'one-shot' cuts once; 'iterative' removes the same share of what is left in each cut
    (Han et al.); 'agp' follows Zhu & Gupta's cubic ramp. Masks keep earlier zeros, so a
    mask config's amount is the cumulative target; channel and head configs get the
    share of what is left, since earlier cuts removed theirs for good.

    >>> pj.prune.cuts(pj.prune.MagnitudeConfig(sparsity=0.9), "iterative", 3)  # .54, .78, .9
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if schedule == "one-shot":
        if rounds != 1:
            raise ValueError(f"rounds = {rounds} needs schedule 'iterative' or 'agp' "
                             "(one-shot cuts once)")
        return [config]
    if isinstance(config, NMConfig) or getattr(config, "n", None) is not None:
        raise ValueError("N:M sparsity is one pattern, cut once; use schedule 'one-shot'")
    if isinstance(config, MagnitudeConfig) and config.quality is not None:
        raise ValueError(f"quality is a one-shot threshold; give sparsity for an {schedule} "
                         "schedule")

    def targets(final: float) -> list[float]:
        if schedule == "iterative":
            return iterative(final, rounds)
        return [agp(r + 1, final, rounds) for r in range(rounds)]

    if isinstance(config, MagnitudeConfig | PatternConfig | SparseGPTConfig | WandaConfig):
        if isinstance(config.sparsity, Mapping):
            per_layer = {name: targets(s) for name, s in config.sparsity.items()}
            return [replace(config, sparsity={n: t[r] for n, t in per_layer.items()})
                    for r in range(rounds)]
        return [replace(config, sparsity=s) for s in targets(config.sparsity)]
    per_group = {n: _relative(targets(r)) for n, r in
                 (getattr(config, "ratios", None) or {}).items()}
    steps = _relative(targets(config.ratio))
    if isinstance(config, ChannelConfig):
        return [replace(config, ratio=step, ratios={n: t[r] for n, t in per_group.items()}
                        or None) for r, step in enumerate(steps)]
    return [replace(config, ratio=step) for step in steps]


def prune_rounds_(
    model: nn.Module,
    configs: Sequence[PruneConfig],
    train_loader: Iterable | None = None,
    *,
    example_inputs: Any = None,
    epochs: int = 0,
    lr: float = 5e-4,
    lr_schedule: str = "constant",
    bn_batches: int = 0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "fine-tune",
    calib: Iterable | None = None,
) -> list:
    """Cut `model` once per config (`cuts` makes them), each cut followed by a fresh
    measure of the BatchNorm statistics on `bn_batches` training batches and `epochs` of
    fine-tuning (Adam from `lr`; `lr_schedule` 'cosine' lowers it to 0), in place.

    What the CLI's prune verb, a recipe's prune stage and the Deep Compression pipeline
    all run. Round r trains with seed `seed + r`; `calib` is what SparseGPT and Wanda
    measure each layer on. Returns what each cut returned.
    """
    if (epochs or bn_batches) and train_loader is None:
        raise ValueError("fine-tuning and BatchNorm statistics need a train_loader")
    done = []
    for r, config in enumerate(configs):
        done.append(prune_(model, config, example_inputs, calib=calib))
        if bn_batches:
            recalibrate_bn_(model, train_loader, bn_batches)
        if epochs:
            what = desc + (f" {r + 1}/{len(configs)}" if len(configs) > 1 else "")
            fit(model, train_loader, epochs=epochs, lr=lr, schedule=lr_schedule,
                seed=seed + r, progress=progress, desc=what)
    return done
