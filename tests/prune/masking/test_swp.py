"""Stripe-wise pruning: filter skeleton, its penalty, folding and stripe masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.prune import skeleton_, stripes_
from penjing.prune.masking.swp import get_skeleton, skeleton_l1, skeletons


def small_vgg() -> nn.Module:
    return pj.models.create("vgg", width=0.25).eval()


def stripe_alive(weight: torch.Tensor) -> torch.Tensor:
    """(out, kh, kw): which stripes hold a non-zero."""
    return (weight != 0).any(dim=1)


def test_a_fresh_skeleton_changes_nothing():
    model = small_vgg()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    names = skeleton_(model)
    assert names == [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert torch.equal(model(x), before)
    assert all(s.shape == (m.out_channels, 1, 3, 3) for s, m in
               zip(skeletons(model).values(),
                   [model.get_submodule(n) for n in names], strict=True))


def test_the_penalty_trains_the_skeleton_and_the_optimizer_sees_it():
    model = small_vgg().train()
    skeleton_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = skeleton_l1(model, 1.0).item()
    for _ in range(3):
        opt.zero_grad()
        skeleton_l1(model, 1e-2).backward()
        opt.step()
    assert skeleton_l1(model, 1.0).item() < start
    assert start == sum(s.numel() for s in skeletons(model).values())  # all ones at first


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_stripes_by_skeleton_fold_exactly_and_zero_the_asked_share(sparsity):
    torch.manual_seed(0)
    model = small_vgg()
    skeleton_(model)
    for s in skeletons(model).values():
        nn.init.uniform_(s, -1, 1)
    x = torch.randn(2, 1, 28, 28)
    conv = model.features[3]
    scale = get_skeleton(conv).skeleton.detach().clone()
    drop = round(sparsity * scale.numel())
    cut = torch.zeros(scale.numel())
    cut[torch.argsort(scale.abs().flatten(), stable=True)[:drop]] = 1
    expected = conv.parametrizations.weight.original.detach() * scale * (
        1 - cut.view_as(scale))
    shares = stripes_(model, sparsity=sparsity)
    assert get_skeleton(conv) is None and pj.prune.get_mask(conv) is not None
    torch.testing.assert_close(conv.weight.detach(), expected, atol=0, rtol=0)
    for name, share in shares.items():
        weight = model.get_submodule(name).weight.detach()
        alive = stripe_alive(weight)
        assert int((~alive).sum()) == round(sparsity * alive.numel()), name
        assert share == pytest.approx(sparsity, abs=1 / alive.numel())
    assert model(x).shape == (2, 10)


def test_threshold_cuts_the_stripes_whose_scale_is_small():
    model = small_vgg()
    skeleton_(model, layers=["features.0"])
    s = get_skeleton(model.features[0]).skeleton
    with torch.no_grad():
        s.fill_(1.0)
        s[0, 0, 1, 1] = 0.01
        s[3, 0, 0, 2] = -0.02
    stripes_(model, threshold=0.05)
    alive = stripe_alive(model.features[0].weight.detach())
    assert int((~alive).sum()) == 2 and not alive[0, 1, 1] and not alive[3, 0, 2]
    assert pj.prune.get_mask(model.features[3]) is None  # no skeleton there: untouched


def test_without_skeleton_stripes_go_by_their_norm():
    model = small_vgg()
    stripes_(model, sparsity=0.5, layers=["features.3"])
    alive = stripe_alive(model.features[3].weight.detach())
    assert int((~alive).sum()) == alive.numel() // 2


def test_bad_input_is_an_error():
    model = small_vgg()
    with pytest.raises(ValueError, match="exactly one of sparsity= or threshold="):
        stripes_(model)
    with pytest.raises(ValueError, match="has no filter skeleton to compare with threshold"):
        stripes_(model, threshold=0.1, layers=["features.0"])
    with pytest.raises(UnsupportedLayerError, match="layer 'classifier.0' is a Linear"):
        skeleton_(model, layers=["classifier.0"])
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        skeleton_(model, layers=["conv9"])
    with pytest.raises(ValueError, match="has no filter skeleton; call"):
        skeleton_l1(model, 1e-4)
    with pytest.raises(UnsupportedLayerError, match="no Conv2d with a kernel larger"):
        skeleton_(pj.models.create("lenet300"))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        stripes_(model, sparsity=1.5)
