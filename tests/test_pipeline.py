from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import penjing as pj
from penjing.pipeline import DeepCompression, LayerPlan, deep_compression_


def test_pipeline_leaves_exact_sparsity_and_few_values(mnist):
    loader = DataLoader(Subset(mnist.train, range(0, 4000, 8)), batch_size=50)
    model = pj.models.create("lenet300")
    recipe = DeepCompression(
        layers={"fc1": LayerPlan(0.9, 4, 5), "fc2": LayerPlan(0.8, 3, 5)},
        prune_rounds=2, finetune_epochs=1, quant_epochs=1,
    )
    record = deep_compression_(model, loader, recipe, test_loader=loader, progress=False)
    assert list(record.accuracy) == ["dense", "pruned", "shared", "quantized"]
    assert not any("parametrizations" in k for k in model.state_dict())
    for layer, plan in ((model.fc1, recipe.layers["fc1"]), (model.fc2, recipe.layers["fc2"])):
        w = layer.weight
        assert int((w == 0).sum()) == round(plan.sparsity * w.numel())
        assert torch.unique(w).numel() <= 2**plan.bits
    assert torch.unique(model.fc3.weight).numel() > 100  # untouched layer stays dense


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0, "bits": 5, "index_bits": 5}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 0.5, "bits": 0, "index_bits": 5}, r"bits must be in 1\.\.16"),
        ({"sparsity": 0.5, "bits": 5, "index_bits": 17}, r"index_bits must be in 1\.\.16"),
    ],
)
def test_bad_layer_plans(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerPlan(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": {}}, "needs at least one layer plan"),
        ({"init": "random"}, "unknown k-means init 'random'; choose one of"),
        ({"prune_rounds": 0}, "prune_rounds must be >= 1, got 0"),
        ({"finetune_epochs": -1}, "finetune_epochs must be >= 0, got -1"),
        ({"quant_epochs": -2}, "quant_epochs must be >= 0, got -2"),
    ],
)
def test_bad_recipes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepCompression(**{"layers": {"fc1": LayerPlan(0.5, 4, 5)}, **kwargs})


def test_recipe_on_a_layer_type_we_cannot_handle(mnist):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10),
                                torch.nn.BatchNorm1d(10))
    recipe = DeepCompression(layers={"2": LayerPlan(0.5, 4, 5)})
    with pytest.raises(pj.errors.UnsupportedLayerError, match="BatchNorm1d"):
        deep_compression_(model, [], recipe, progress=False)


def test_recipe_seed_reaches_the_forgy_init():
    # Regression: the recipe's seed seeded fine-tuning but not the forgy init's draw.
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(64, 32))
    shared = []
    for seed in (0, 1, 1):
        model = copy.deepcopy(dense)
        recipe = DeepCompression(layers={"0": LayerPlan(0.5, 3, 5)}, prune_rounds=1,
                                 finetune_epochs=0, quant_epochs=0, init="forgy", seed=seed)
        deep_compression_(model, [], recipe, progress=False)
        shared.append(model[0].weight.detach())
    assert not torch.equal(shared[0], shared[1])
    assert torch.equal(shared[1], shared[2])


def test_recipe_from_a_bytes_plan_keeps_its_sparsity_and_bits():
    from penjing.analysis import Budget, SensitivityTable, plan_budget
    from penjing.pipeline import recipe_from_plan

    sizes = {"fc1": 235_200, "fc2": 30_000}
    prune = SensitivityTable("accuracy", "sparsity", "element", 0.9, [0.5, 0.9, 0.98],
                             {"fc1": [0.9, 0.89, 0.8], "fc2": [0.9, 0.85, 0.5]}, sizes)
    bits = SensitivityTable("accuracy", "bits", "kmeans", 0.9, [6, 4, 2],
                            {"fc1": [0.9, 0.9, 0.88], "fc2": [0.9, 0.89, 0.8]}, sizes)
    plan = plan_budget(prune, Budget(bytes=12_000), bits=bits)
    recipe = recipe_from_plan(plan, prune_rounds=2)
    assert recipe.prune_rounds == 2
    for name, layer in recipe.layers.items():
        assert layer.sparsity == plan.layers[name].sparsity
        assert layer.bits == plan.layers[name].bits and layer.index_bits == 8
    with pytest.raises(ValueError, match="no bits"):
        recipe_from_plan(plan_budget(prune, Budget(sparsity=0.9)))


def test_shared_biases_take_few_values_and_stay_close():
    from penjing.pipeline import share_biases_

    model = pj.models.create("lenet300")
    before = {n: m.bias.detach().clone() for n, m in model.named_children()}
    done = share_biases_(model, {"fc1": 3, "fc2": 2})
    assert done == {"fc1": 8, "fc2": 4}
    assert torch.equal(model.fc3.bias, before["fc3"])
    spread = float(before["fc1"].max() - before["fc1"].min())
    assert float((model.fc1.bias.detach() - before["fc1"]).abs().max()) < spread / 8
    with pytest.raises(ValueError, match="bits"):
        share_biases_(model, 0)
