from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.prune import magnitude_, masks


def zeros(module: nn.Module) -> int:
    return int((module.weight == 0).sum())


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_reaches_target_sparsity_exactly_per_layer(sparsity):
    model = pj.models.create("lenet5")
    magnitude_(model, sparsity=sparsity)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            assert zeros(module) == round(sparsity * module.weight.numel()), name


def test_zero_sparsity_is_noop():
    model = pj.models.create("lenet300")
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    magnitude_(model, sparsity=0.0)
    assert torch.equal(model(x), before)


def test_prunes_the_smallest_magnitudes():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -1.0]]))
    model = nn.Sequential(layer)
    magnitude_(model, sparsity=0.5)
    expected = torch.tensor([[0.0, -5.0, 0.0, 2.0], [0.0, 0.0, 4.0, -1.0]])
    assert torch.equal(layer.weight, expected)


def test_global_scope_hits_the_total_and_spreads_unevenly():
    model = pj.models.create("lenet300")
    with torch.no_grad():
        model.fc3.weight.add_(10.0)  # fc3 now holds the largest weights by far
    result = magnitude_(model, sparsity=0.8, scope="global")
    total = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    assert sum(zeros(m) for m in (model.fc1, model.fc2, model.fc3)) == round(0.8 * total)
    assert result["fc3"] == 0.0 and result["fc1"] > 0.8


def test_quality_threshold_prunes_below_quality_times_std():
    model = pj.models.create("lenet300")
    w = model.fc1.weight.detach().clone()
    magnitude_(model, quality=1.0, layers=["fc1"])
    expected_zeros = int((w.abs() < w.std()).sum())
    assert zeros(model.fc1) == expected_zeros
    assert zeros(model.fc2) == 0


def test_iterative_pruning_keeps_earlier_zeros():
    model = pj.models.create("lenet300")
    magnitude_(model, sparsity=0.5)
    first = model.fc1.weight == 0
    magnitude_(model, sparsity=0.8)
    assert bool((model.fc1.weight[first] == 0).all())
    assert zeros(model.fc1) == round(0.8 * model.fc1.weight.numel())


def test_masks_survive_fine_tuning(mnist):
    model = pj.models.create("lenet300")
    magnitude_(model, sparsity={"fc1": 0.9, "fc2": 0.7})
    pruned = {name: mask == 0 for name, mask in masks(model).items()}
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(mnist.train, range(0, 4000, 16)),
                                         batch_size=64)
    for optimizer in ("adam", "sgd", "adamw"):
        pj.train.fit(model, loader, epochs=1, optimizer=optimizer, lr=1e-2, progress=False)
    modules = dict(model.named_modules())
    for name, gone in pruned.items():
        weight = modules[name].weight
        assert bool((weight[gone] == 0).all()), name
        assert bool((modules[name].parametrizations.weight.original.grad[gone] == 0).all())
        assert bool((weight[~gone] != 0).all())  # the survivors were trained, not pruned


def test_finalize_keeps_outputs_and_removes_parametrizations():
    model = pj.models.create("lenet5")
    magnitude_(model, sparsity=0.7)
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    assert sorted(pj.finalize_(model)) == ["conv1", "conv2", "fc1", "fc2"]
    assert torch.equal(model(x), before)
    assert not any("parametrizations" in k for k in model.state_dict())


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.2])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match=r"sparsity .*must be in \[0, 1\)"):
        magnitude_(pj.models.create("lenet300"), sparsity=bad)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedLayerError, match="'1' is a BatchNorm1d"):
        magnitude_(model, sparsity=0.5, layers=["1"])


def test_unknown_layer_lists_the_prunable_ones():
    with pytest.raises(ValueError, match="fc1"):
        magnitude_(pj.models.create("lenet300"), sparsity=0.5, layers=["fc9"])


def test_model_without_prunable_layers():
    with pytest.raises(UnsupportedLayerError, match="no Linear or Conv"):
        magnitude_(nn.Sequential(nn.ReLU()), sparsity=0.5)


def test_a_bad_value_leaves_the_model_as_it_was():
    # Regression: fc1 was pruned before the bad sparsity of fc2 raised.
    model = pj.models.create("lenet300")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sparsity of 'fc2' must be in \[0, 1\), got 1.5"):
        magnitude_(model, sparsity={"fc1": 0.5, "fc2": 1.5})
    with pytest.raises(ValueError, match=r"quality of 'fc2' must be a number >= 0, got -1"):
        magnitude_(model, quality={"fc1": 1.0, "fc2": -1})
    assert not masks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of sparsity= or quality="),
        ({"sparsity": 0.5, "quality": 1.0}, "exactly one of sparsity= or quality="),
        ({"sparsity": 0.5, "scope": "model"}, "scope must be 'layer' or 'global', got 'model'"),
        ({"quality": 1.0, "scope": "global"}, "quality= is a per-layer rule"),
        ({"sparsity": {"fc1": 0.5}, "scope": "global"}, "one sparsity for all layers, not a dict"),
        ({"sparsity": {"fc1": 0.5}, "layers": ["fc2"]}, "keys of the dict or as layers="),
    ],
)
def test_contradictory_arguments_are_refused(kwargs, message):
    model = pj.models.create("lenet300")
    with pytest.raises(ValueError, match=message):
        magnitude_(model, **kwargs)
    assert not masks(model)
