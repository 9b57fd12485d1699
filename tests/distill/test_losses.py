from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from penjing.distill import UNLABELED, Ensemble, kd_loss, logit_mse, soft_target


def softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_soft_target_matches_hand_computation():
    s, t, temp = [1.0, 2.0, 0.0], [0.0, 1.0, 3.0], 2.0
    p, q = softmax(t, temp), softmax(s, temp)
    expected = temp**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    got = soft_target(torch.tensor([s]), torch.tensor([t]), temp)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_soft_target_is_the_batch_mean_and_zero_on_agreement():
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    rows = [soft_target(s[i : i + 1], t[i : i + 1], 3.0) for i in range(5)]
    assert float(soft_target(s, t, 3.0)) == pytest.approx(float(sum(rows) / 5), rel=1e-6)
    assert float(soft_target(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_target(s, t, 3.0)) > 0


def test_soft_target_is_stable_for_huge_logits():
    s, t = torch.tensor([[1e4, 0.0, -1e4]]), torch.tensor([[0.0, 1e4, -1e4]])
    loss = soft_target(s, t, 1.0)
    assert torch.isfinite(loss)
    # softmax ignores a shift of the logits, so the loss must too
    assert float(soft_target(s + 5e3, t - 5e3, 1.0)) == pytest.approx(float(loss), rel=1e-5)
    assert float(soft_target(s / 1e4, t / 1e4, 1e-4)) == pytest.approx(float(loss) * 1e-8, rel=1e-3)


def test_high_temperature_limit_is_logit_mse():
    # Hinton et al. §2.1: for zero-mean logits, T²·KL → Σ(s − t)² / (2·classes) as T grows.
    s, t = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    limit = logit_mse(s, t) / (2 * 10)
    assert float(soft_target(s, t, 1000.0)) == pytest.approx(float(limit), rel=1e-2)


def test_logit_mse_by_hand():
    got = logit_mse(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 1.0]]))
    assert float(got) == pytest.approx(((1 + 4) + (9 + 1)) / 2)


def test_kd_loss_is_the_weighted_sum():
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    soft, hard = soft_target(s, t, 4.0), nn.functional.cross_entropy(s, y)
    got = kd_loss(s, t, y, temperature=4.0, alpha=0.7)
    assert float(got) == pytest.approx(float(0.7 * soft + 0.3 * hard), rel=1e-6)
    default = kd_loss(s, t, y)  # T = 4, alpha = 0.9: most weight on the soft part
    assert float(default) == pytest.approx(float(0.9 * soft + 0.1 * hard), rel=1e-6)
    assert float(kd_loss(s, t, None)) == pytest.approx(float(soft), rel=1e-6)
    mse = kd_loss(s, t, y, alpha=0.5, soft="mse")
    assert float(mse) == pytest.approx(float(0.5 * logit_mse(s, t) + 0.5 * hard), rel=1e-6)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan")])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_target(torch.randn(2, 3), torch.randn(2, 3), temperature)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Ensemble([nn.Linear(3, 3)], temperature)


def test_unlabelled_rows_get_only_the_soft_part():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.tensor([3, UNLABELED, 7, UNLABELED])
    soft = soft_target(s, t, 4.0)
    hard = nn.functional.cross_entropy(s[[0, 2]], y[[0, 2]])
    got = kd_loss(s, t, y, temperature=4.0, alpha=0.8)
    assert float(got) == pytest.approx(float(0.8 * soft + 0.2 * hard), rel=1e-6)
    nobody = torch.full((4,), UNLABELED)
    assert float(kd_loss(s, t, nobody, alpha=0.8)) == pytest.approx(float(soft), rel=1e-6)


def test_bad_weights_and_losses():
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        kd_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="unknown soft loss 'l1'"):
        kd_loss(s, t, y, soft="l1")
    with pytest.raises(TypeError, match="temperature must be a number"):
        soft_target(s, t, "4")


def test_different_class_counts_are_refused():
    with pytest.raises(ValueError, match="teacher gives 10 logits, the student 5"):
        soft_target(torch.randn(2, 5), torch.randn(2, 10))


def test_ensemble_averages_softened_distributions():
    torch.manual_seed(0)
    teachers = [nn.Linear(6, 4) for _ in range(3)]
    x, temp = torch.randn(5, 6), 3.0
    ensemble = Ensemble(teachers, temp)
    mean = torch.stack([torch.softmax(m(x) / temp, 1) for m in teachers]).mean(0)
    torch.testing.assert_close(torch.softmax(ensemble(x) / temp, 1), mean)
    # one teacher: its own distribution at T, so the KD loss is unchanged
    single = Ensemble(teachers[:1], temp)
    s = torch.randn(5, 4)
    direct = soft_target(s, teachers[0](x), temp)
    torch.testing.assert_close(soft_target(s, single(x), temp), direct)


def test_ensemble_refuses_mismatched_teachers():
    with pytest.raises(ValueError, match="same classes"):
        Ensemble([nn.Linear(6, 4), nn.Linear(6, 5)])(torch.randn(2, 6))
    with pytest.raises(ValueError, match="at least one teacher"):
        Ensemble([])
