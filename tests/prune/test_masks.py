from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.core.parametrize import get_mask, set_mask_


def test_mask_of_another_shape_is_refused():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"the weight's shape \(3, 4\), got \(4, 3\)"):
        set_mask_(layer, torch.ones(4, 3))
    assert get_mask(layer) is None


def test_mask_on_top_of_another_parametrization_is_refused():
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    layer = nn.Linear(4, 3)
    parametrize.register_parametrization(layer, "weight", Double())
    with pytest.raises(ValueError, match="prune before weight sharing or finalize_ first"):
        set_mask_(layer, torch.ones(3, 4))
    assert get_mask(layer) is None


def test_a_new_mask_replaces_the_old_and_zeroes_the_stored_weight():
    layer = nn.Linear(4, 3)
    first = torch.ones(3, 4)
    first[0] = 0
    set_mask_(layer, first)
    second = torch.ones(3, 4)
    second[:, 0] = 0
    set_mask_(layer, second)
    assert torch.equal(get_mask(layer), second)
    assert len(layer.parametrizations.weight) == 1
    stored = layer.parametrizations.weight.original
    assert bool((stored[0] == 0).all()) and bool((stored[:, 0] == 0).all())


def test_finalizing_a_copy_leaves_the_original_working():
    # torch shares a parametrized module's class with its deepcopy: removing the
    # parametrization from the copy used to delete the weight property of the original
    import copy

    import penjing as pj

    model = pj.models.create("lenet300")
    pj.prune.magnitude_(model, sparsity=0.9)
    pj.quant.kmeans_(model, bits=4)
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)
    clone = copy.deepcopy(model)
    pj.finalize_(clone)
    assert torch.equal(clone(x), expected) and torch.equal(model(x), expected)
    assert pj.quant.get_shared(model.fc1) is not None
