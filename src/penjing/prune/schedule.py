"""Pruning schedules: pure functions from a step to the sparsity to reach by then."""

from __future__ import annotations

from penjing.prune.magnitude import check_sparsity


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
