"""Weight criteria: the sums shared across groups (one |w| per weight) score exactly as
each group scored alone."""

from __future__ import annotations

import torch
from torch import nn

from penjing.prune.structural.criteria import l1, l2, shared_sums
from penjing.prune.structural.graph import dependency_graph


def test_shared_sums_give_bit_identical_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, groups=4), nn.ReLU(), nn.Conv2d(24, 32, 1),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    groups = dependency_graph(model, torch.randn(1, 3, 12, 12)).groups()
    for criterion in (l1, l2):
        alone = [criterion(model, g) for g in groups]
        with shared_sums():
            shared = [criterion(model, g) for g in groups]
            again = [criterion(model, g) for g in groups]  # now read from what is kept
        for a, b, c in zip(alone, shared, again, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)
