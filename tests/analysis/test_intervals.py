"""Intervals of accuracies and of paired changes, and the verdict a target gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import penjing as pj
from penjing.analysis.intervals import (
    Interval,
    accuracy_interval,
    correct,
    mean_sd,
    paired_difference,
    verdict,
    wilson,
)


@pytest.mark.parametrize("k, n", [(930, 1000), (0, 20), (20, 20), (1, 7), (9_312, 10_000)])
def test_wilson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    want = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    got = wilson(k, n)
    assert got.value == k / n
    assert got.low == pytest.approx(want.low, abs=1e-12)
    assert got.high == pytest.approx(want.high, abs=1e-12)


def test_wilson_by_hand_at_93_percent_of_1000():
    # the case: about ±1.6 points on the 1,000 test images of the MNIST subset
    got = wilson(930, 1000)
    assert (round(got.low, 4), round(got.high, 4)) == (0.9125, 0.9442)
    assert got.format() == "93.00 % [91.25, 94.42]"


def test_accuracy_interval_counts_the_booleans():
    hits = torch.tensor([True] * 45 + [False] * 5)
    assert accuracy_interval(hits) == wilson(45, 50)
    assert accuracy_interval(np.array([1, 0, 1, 1])) == wilson(3, 4)


def _pairs(both: int, only_a: int, only_b: int, neither: int):
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return torch.tensor(a), torch.tensor(b)


def test_paired_difference_is_the_change_and_flips_with_the_order():
    a, b = _pairs(900, 10, 30, 60)
    change = paired_difference(a, b)
    assert change.value == pytest.approx(0.02)
    assert change.low < 0.02 < change.high
    back = paired_difference(b, a)
    assert back.value == pytest.approx(-change.value)
    assert back.low == pytest.approx(-change.high) and back.high == pytest.approx(-change.low)


def test_paired_difference_is_narrower_than_two_independent_accuracies():
    # most images agree: the change is known far better than either accuracy
    a, b = _pairs(920, 5, 3, 72)
    change = paired_difference(a, b)
    assert change.half_width < 0.5 * accuracy_interval(a).half_width
    assert 0.0 in change


def test_identical_models_change_nothing():
    a = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.9
    change = paired_difference(a, a.clone())
    assert change.value == 0.0
    # method 10 stays a little open without discordant pairs (Wilson is asymmetric)
    assert -0.01 < change.low <= 0.0 <= change.high < 0.01


def test_paired_difference_agrees_with_a_bootstrap_over_images():
    a, b = _pairs(900, 10, 30, 60)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 1000, size=(4000, 1000))
    changes = b.numpy()[picks].mean(1) - a.numpy()[picks].mean(1)
    low, high = np.percentile(changes, [2.5, 97.5])
    change = paired_difference(a, b)
    assert change.low == pytest.approx(low, abs=0.004)
    assert change.high == pytest.approx(high, abs=0.004)


def test_paired_difference_covers_the_true_change_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    n, runs, covered = 400, 600, 0
    for _ in range(runs):
        base = rng.random(n) < 0.9
        flip_down = base & (rng.random(n) < 0.04)
        flip_up = ~base & (rng.random(n) < 0.2)
        after = (base & ~flip_down) | flip_up
        true_change = 0.1 * 0.2 - 0.9 * 0.04
        covered += true_change in paired_difference(base, after)
    assert 0.92 <= covered / runs <= 0.99


def test_verdict_is_met_only_outside_the_noise():
    drop = Interval(0.004, -0.002, 0.010, 1000)
    assert verdict(drop, at_most=0.015) == "met"
    assert verdict(drop, at_most=0.005) == "within noise"
    assert verdict(drop, at_most=-0.003) == "missed"
    gain = Interval(0.012, 0.003, 0.021, 1000)
    assert verdict(gain, at_least=0.0) == "met"
    assert verdict(gain.negated(), at_least=0.0) == "missed"
    assert verdict(Interval(0.01, -0.01, 0.03, 1000), at_least=0.0) == "within noise"


def test_bad_input_says_what_was_wrong():
    with pytest.raises(ValueError, match="exactly one of at_most= and at_least="):
        verdict(Interval(0, 0, 0, 1), at_most=1, at_least=0)
    with pytest.raises(ValueError, match="successes must be in \\[0, n=10\\], got 11"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="n must be a whole number >= 1, got 0"):
        wilson(0, 0)
    with pytest.raises(ValueError, match="same images; got 3 and 4"):
        paired_difference([1, 0, 1], [1, 1, 1, 0])
    with pytest.raises(ValueError, match="only True/False"):
        accuracy_interval([0.5, 1.0])
    with pytest.raises(ValueError, match="confidence must be in \\(0, 1\\), got 95"):
        wilson(5, 10, confidence=95)


def test_mean_sd_over_seeds():
    assert mean_sd([0.91, 0.93, 0.92]) == pytest.approx((0.92, 0.01))
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_correct_agrees_with_evaluate(mnist):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    test = torch.utils.data.DataLoader(mnist.test, batch_size=300)
    hits = correct(model, test)
    assert hits.dtype == torch.bool and hits.shape == (1000,)
    assert float(hits.float().mean()) == pytest.approx(pj.train.evaluate(model, test))
    with pytest.raises(TypeError, match=r"\(inputs, labels\) batches"):
        correct(model, [torch.zeros(2, 1, 28, 28)])
