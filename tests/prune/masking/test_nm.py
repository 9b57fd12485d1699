"""N:M semi-structured masks and the checker that a weight meets N:M."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.prune import is_nm, nm_
from penjing.prune.masking.nm import nm_mask


def test_keeps_the_n_largest_of_every_m_inputs():
    weight = torch.tensor([[0.1, -3.0, 0.2, 2.0, 5.0, -0.1, 0.3, -0.4]])
    mask = nm_mask(weight)
    assert mask.tolist() == [[0, 1, 0, 1, 1, 0, 0, 1]]


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    torch.manual_seed(0)
    weight = torch.randn(6, 8, 3, 3)
    mask = nm_mask(weight, 2, 4)
    per_group = mask.movedim(1, -1).reshape(-1, 4).sum(dim=1)
    assert torch.equal(per_group, torch.full_like(per_group, 2))
    assert is_nm(weight * mask) and not is_nm(weight)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_every_layer_meets_n_m_and_exactly_n_of_m_remain(n, m):
    torch.manual_seed(0)
    model = pj.models.create("lenet300")
    done = nm_(model, n, m)
    # 784, 300 and 100 inputs: layers whose input count m does not divide are skipped
    assert done == [f for f, k in (("fc1", 784), ("fc2", 300), ("fc3", 100)) if k % m == 0]
    for name in done:
        weight = model.get_submodule(name).weight.detach()
        assert is_nm(weight, n, m), name
        assert int((weight != 0).sum()) == weight.numel() * n // m, name


def test_checker_rejects_a_group_with_one_non_zero_too_many():
    weight = torch.zeros(2, 8)
    weight[0, :2] = 1.0
    assert is_nm(weight)
    weight[1, 4:7] = 1.0
    assert not is_nm(weight)
    assert not is_nm(torch.ones(2, 6))  # 6 inputs cannot be cut into groups of 4


def test_pattern_survives_fine_tuning():
    torch.manual_seed(0)
    model = pj.models.create("lenet5")
    nm_(model, layers=["conv2", "fc1"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert is_nm(model.conv2.weight) and is_nm(model.fc1.weight)


def test_bad_input_is_an_error():
    model = pj.models.create("lenet5")
    with pytest.raises(ValueError, match=r"0 < n < m \(2:4 by default\), got 4:4"):
        nm_(model, 4, 4)
    with pytest.raises(ValueError, match="layer 'conv1' has 1 inputs per output, not a "
                       "multiple of 4"):
        nm_(model, layers=["conv1"])
    with pytest.raises(ValueError, match="no layer named 'fc9'"):
        nm_(model, layers=["fc9"])
