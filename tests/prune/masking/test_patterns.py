"""Structured masks: shapes, kernels, stripes, vectors, blocks, and the group lasso."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.prune import Block, Kernel, Shape, Stripe, is_pattern, pattern_
from penjing.prune.masking.patterns import group_ids, group_lasso, group_sizes, pattern_mask


def test_shape_groups_are_im2col_columns():
    weight = torch.randn(5, 3, 2, 2)
    ids, count = group_ids(weight, Shape())
    assert count == 12
    # every filter has the same id at the same (c, kh, kw) position
    assert torch.equal(ids, ids[:1].expand_as(ids))
    assert sorted(ids[0].flatten().tolist()) == list(range(12))


def test_kernel_and_stripe_groups():
    weight = torch.randn(4, 3, 3, 3)
    ids, count = group_ids(weight, Kernel())
    assert count == 12 and ids[2, 1].unique().tolist() == [2 * 3 + 1]
    ids, count = group_ids(weight, Stripe())
    assert count == 4 * 9 and ids[2, :, 1, 0].unique().tolist() == [2 * 9 + 3]


def test_vector_and_block_tiles_of_the_weight_matrix():
    weight = torch.randn(8, 6)
    ids, count = group_ids(weight, Block(4, 1))
    assert count == 2 * 6
    assert ids[0:4, 5].unique().numel() == 1 and ids[4, 5] != ids[3, 5]
    ids, count = group_ids(weight, Block(2, 2))
    assert count == 4 * 3 and ids[0:2, 2:4].unique().numel() == 1


def test_ragged_blocks_cover_the_edge():
    weight = torch.randn(5, 9)  # 3 × 5 tiles of 2×2, the last row and column half empty
    sizes = group_sizes(weight, Block(2, 2))
    assert len(sizes) == 15 and int(sizes.sum()) == 45 and int(sizes.min()) == 1


@pytest.mark.parametrize("pattern", ["shape", "kernel", "stripe", "vector", "block"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75])
def test_reaches_the_asked_share_of_groups_exactly(pattern, sparsity):
    model = pj.models.create("vgg", width=0.25)
    pattern_(model, pattern, sparsity=sparsity)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if pattern in ("kernel", "stripe") and isinstance(module, nn.Linear):
            assert pj.prune.get_mask(module) is None, name
            continue
        weight = module.weight.detach()
        ids, count = group_ids(weight, pattern)
        zero = torch.zeros(count).index_add(0, ids.flatten(), (weight != 0).flatten().float())
        assert int((zero == 0).sum()) == round(sparsity * count), name
        assert is_pattern(weight, pattern), name


def test_removes_the_lowest_norm_columns():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.1, -3.0], [-2.0, 0.2, 0.5]]))
    pattern_(nn.Sequential(layer), Shape(), sparsity=0.34)  # round(0.34 · 3) = 1 column
    assert torch.equal(layer.weight, torch.tensor([[1.0, 0.0, -3.0], [-2.0, 0.0, 0.5]]))


def test_masks_hold_through_training_and_stack_with_earlier_masks():
    torch.manual_seed(0)
    model = pj.models.create("lenet5")
    pj.prune.magnitude_(model, sparsity=0.3)
    before = {n: m.clone() for n, m in pj.prune.masks(model).items()}
    pattern_(model, "block", sparsity=0.5)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name, mask in pj.prune.masks(model).items():
        assert bool((mask <= before[name]).all()), name  # old zeros stay zero
        weight = model.get_submodule(name).weight
        assert bool((weight[mask == 0] == 0).all()), name
        ids, count = group_ids(mask, "block")
        alive = torch.zeros(count).index_add(0, ids.flatten(), mask.flatten())
        assert int((alive == 0).sum()) >= round(0.5 * count), name  # whole blocks gone


def test_zero_sparsity_is_noop():
    model = pj.models.create("lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    pattern_(model, "shape", sparsity=0.0)
    assert torch.equal(model(x), before)


def test_group_lasso_is_the_weighted_sum_of_group_norms():
    layer = nn.Conv2d(2, 3, 2, bias=False)
    model = nn.Sequential(layer)
    w = layer.weight.detach()
    expected = sum(math.sqrt(3) * float(w[:, c, i, j].norm())
                   for c in range(2) for i in range(2) for j in range(2))
    value = group_lasso(model, Shape(), lam=0.5)
    assert value.item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_group_lasso_training_zeroes_whole_groups_first():
    """Descending the group lasso alone shrinks every column at the same rate, so the
    smallest columns reach zero while the others are still there."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([0.05, 1, 1, 0.05, 1, 1]))
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        group_lasso(model, "shape", lam=0.1).backward()
        opt.step()
    norms = layer.weight.detach().norm(dim=0)
    assert float(norms[[0, 3]].max()) < 0.02 < float(norms[[1, 2, 4, 5]].min())


def test_group_lasso_loss_adds_to_the_task_loss():
    model = pj.models.create("lenet5")
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain = pj.train.cross_entropy(model, x, y)
    total = pj.prune.group_lasso_loss("kernel", lam=1e-3)(model, x, y)
    assert total.item() == pytest.approx(
        (plain + group_lasso(model, "kernel", 1e-3)).item(), rel=1e-6)


def test_pattern_mask_on_a_conv_is_a_shape_mask():
    weight = torch.randn(6, 4, 3, 3)
    mask = pattern_mask(weight, "shape", 0.5)
    assert torch.equal(mask, mask[:1].expand_as(mask))
    assert int((mask[0] == 0).sum()) == 18


def test_bad_input_is_an_error():
    model = pj.models.create("lenet5")
    with pytest.raises(ValueError, match="unknown pattern 'diagonal'"):
        pattern_(model, "diagonal")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        pattern_(model, "shape", sparsity=1.0)
    with pytest.raises(ValueError, match="Block rows must be a positive int"):
        Block(0, 2)
    with pytest.raises(UnsupportedLayerError, match="layer 'fc1' is a Linear; Kernel"):
        pattern_(model, "kernel", layers=["fc1"])
    with pytest.raises(ValueError, match="no layer named 'fc9'"):
        pattern_(model, "shape", layers=["fc9"])
    with pytest.raises(ValueError, match="lam must be a number >= 0"):
        group_lasso(model, "shape", lam=-1)
    with pytest.raises(UnsupportedLayerError, match="layer 'fc1' is a Linear; Stripe"):
        group_lasso(model, "stripe", lam=1e-4, layers=["fc1"])
    with pytest.raises(UnsupportedLayerError, match="has no chosen layer for Kernel\\(\\) groups"):
        group_lasso(pj.models.create("lenet300"), "kernel", lam=1e-4)
