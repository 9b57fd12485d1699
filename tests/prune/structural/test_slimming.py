"""Network slimming: the L1 penalty on BatchNorm scales and pruning by |γ|."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.prune import bn_l1, slim, slimming_loss


def test_penalty_is_lambda_times_the_sum_of_abs_gamma():
    model = pj.models.create("vgg", width=0.25)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(-0.5)
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn_l1(model, 1e-2).item() == pytest.approx(1e-2 * 0.5 * channels)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    total = slimming_loss(1e-2)(model, x, y)
    assert total.item() == pytest.approx(
        pj.train.cross_entropy(model, x, y).item() + 1e-2 * 0.5 * channels, rel=1e-6)


def test_training_with_the_penalty_shrinks_gamma():
    model = pj.models.create("vgg", width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = bn_l1(model, 1.0).item()
    for _ in range(5):
        opt.zero_grad()
        bn_l1(model, 0.1).backward()
        opt.step()
    assert bn_l1(model, 1.0).item() < start - 0.2


def test_slim_removes_the_channels_with_the_smallest_gamma_network_wide():
    model = pj.models.create("vgg", width=0.25).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        model.features[1].weight[[1, 5]] = 1e-3  # two weak channels after the first conv
        model.features[15].weight[:24] = 1e-4  # and most of the last block's
    x = torch.randn(2, 1, 28, 28)
    total = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    small = slim(model, x, ratio=26 / total)
    assert small.features[0].out_channels == 6
    kept = small.features[0].weight.detach()
    assert torch.equal(kept, model.features[0].weight.detach()[[0, 2, 3, 4, 6, 7]])
    assert small.features[14].out_channels == 8  # 32 - 24
    assert small(x).shape == (2, 10)


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="lam must be >= 0, got -1"):
        bn_l1(pj.models.create("vgg", width=0.25), -1)
    with pytest.raises(ValueError, match="has no affine BatchNorm layer"):
        bn_l1(pj.models.create("lenet5"), 1e-4)


def test_gamma_of_a_residual_stream_is_averaged_over_its_batchnorms():
    """resnet20's first stage shares its channels across 4 BatchNorms: their mean |γ|
    is the score, so it compares with single-BN channels in a global ranking."""
    model = pj.models.create("resnet20", width=0.5).eval()
    x = torch.randn(1, 1, 28, 28)
    (group,) = [g for g in pj.prune.groups(model, x) if "bn1" in g.modules]
    bns = [model.get_submodule(s.fqn) for s in group.slices
           if s.name == "weight" and isinstance(model.get_submodule(s.fqn), nn.BatchNorm2d)]
    assert len(bns) == 4  # the stem's and the three blocks' second BNs in stage one
    expected = torch.stack([bn.weight.detach().abs() for bn in bns]).mean(dim=0)
    torch.testing.assert_close(pj.prune.structural.criteria.bn_gamma(model, group), expected)
