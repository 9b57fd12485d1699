from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.quant import get_shared, kmeans_


def test_shared_layer_has_at_most_2_pow_bits_values_and_keeps_zeros():
    model = pj.models.create("lenet300")
    pj.prune.magnitude_(model, sparsity=0.9)
    pruned = model.fc1.weight == 0
    infos = kmeans_(model, bits=4)
    w = model.fc1.weight
    assert torch.equal(w == 0, pruned)
    assert torch.unique(w).numel() <= 2**4  # 15 centroids plus the zero
    assert infos["fc1"].clusters == 15


def test_unpruned_layer_gets_all_2_pow_bits_centroids():
    model = nn.Sequential(nn.Linear(64, 64))
    kmeans_(model, bits=3)
    assert torch.unique(model[0].weight).numel() == 8


def test_centroid_gradient_is_the_sum_of_member_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    kmeans_(nn.Sequential(layer), bits=2)
    shared = get_shared(layer)
    x = torch.randn(5, 8)
    layer(x).square().sum().backward()
    # Gradient of the loss w.r.t. the materialised weight, computed by hand.
    w = layer.weight.detach().requires_grad_(True)
    nn.functional.linear(x, w, layer.bias.detach()).square().sum().backward()
    for j in range(shared.centroids.numel()):
        members = shared.codes == j + 1
        assert shared.centroids.grad[j] == pytest.approx(float(w.grad[members].sum()), rel=1e-5)


def test_training_moves_centroids_but_not_ties_or_zeros(mnist):
    model = pj.models.create("lenet300")
    pj.prune.magnitude_(model, sparsity=0.8)
    kmeans_(model, bits=3)
    codes = get_shared(model.fc1).codes.clone()
    before = get_shared(model.fc1).centroids.detach().clone()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(mnist.train, range(0, 4000, 16)),
                                         batch_size=64)
    pj.train.fit(model, loader, epochs=1, lr=1e-3, progress=False)
    after = get_shared(model.fc1).centroids.detach()
    assert not torch.equal(before, after)
    w = model.fc1.weight.detach()
    assert torch.equal(w == 0, codes == 0)
    for j in range(after.numel()):
        assert bool((w[codes == j + 1] == after[j]).all())


@pytest.mark.parametrize("bits", [0, 17])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits .*must be in 1\.\.16"):
        kmeans_(pj.models.create("lenet300"), bits=bits)


def test_sharing_twice_is_refused():
    model = pj.models.create("lenet300")
    kmeans_(model, bits=2)
    with pytest.raises(ValueError, match="already shares"):
        kmeans_(model, bits=2)


def test_a_bad_layer_leaves_the_model_as_it_was():
    # Regression: fc1 was shared before the bad bits of fc2 (or the shared fc3) raised.
    model = pj.models.create("lenet300")
    with pytest.raises(ValueError, match=r"bits of 'fc2' must be in 1\.\.16, got 0"):
        kmeans_(model, bits={"fc1": 4, "fc2": 0})
    assert get_shared(model.fc1) is None
    kmeans_(model, bits={"fc3": 2})
    with pytest.raises(ValueError, match="'fc3' already shares"):
        kmeans_(model, bits={"fc1": 4, "fc3": 2})
    assert get_shared(model.fc1) is None


def test_finalized_shared_weights_train_again(mnist):
    # Regression: kmeans_ froze the original weight, which finalize_ turns back into the
    # layer's weight, so fine-tuning a compressed model silently left its weights alone.
    model = pj.models.create("lenet300")
    pj.prune.magnitude_(model, sparsity=0.5)
    kmeans_(model, bits=3)
    pj.finalize_(model)
    assert all(p.requires_grad for p in model.parameters())
    before = model.fc1.weight.detach().clone()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(mnist.train, range(0, 4000, 40)),
                                         batch_size=50)
    pj.train.fit(model, loader, epochs=1, progress=False)
    assert not torch.equal(model.fc1.weight, before)
