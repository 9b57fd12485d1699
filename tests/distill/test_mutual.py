from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.distill import mutual_, mutual_losses, soft_target


def test_losses_are_ce_plus_mean_peer_kl():
    logits = [torch.randn(4, 10) for _ in range(3)]
    y = torch.randint(0, 10, (4,))
    losses = mutual_losses(logits, y)
    for k, loss in enumerate(losses):
        peers = [soft_target(logits[k], logits[j], 1.0) for j in range(3) if j != k]
        expected = nn.functional.cross_entropy(logits[k], y) + sum(peers) / 2
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    same = mutual_losses([logits[0], logits[0].clone()], y)
    assert float(same[0]) == pytest.approx(float(nn.functional.cross_entropy(logits[0], y)))


def test_each_loss_trains_only_its_own_student():
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    loss_a, _ = mutual_losses([a(x), b(x)], y)
    loss_a.backward()
    assert a.weight.grad is not None and b.weight.grad is None


def test_two_students_learn_together(small_train, test_loader):
    torch.manual_seed(6)
    students = [pj.models.create("mlp30") for _ in range(2)]
    histories = mutual_(students, small_train, epochs=2, test_loader=test_loader, progress=False)
    for history, student in zip(histories, students, strict=True):
        assert history.loss[-1] < history.loss[0]
        assert history.accuracy[-1] == pj.train.evaluate(student, test_loader) > 0.8
        assert not student.training


def test_bad_student_lists(small_train):
    one = pj.models.create("mlp30")
    with pytest.raises(ValueError, match="at least 2 students, got 1"):
        mutual_([one], small_train)
    with pytest.raises(ValueError, match="same module appears twice"):
        mutual_([one, one], small_train)
    with pytest.raises(ValueError, match="student 0 gives 10 logits, student 1 gives 5"):
        mutual_([one, pj.models.create("mlp30", num_classes=5)], small_train)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mutual_([one, pj.models.create("mlp30")], small_train, temperature=0)
