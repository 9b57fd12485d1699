from __future__ import annotations

import pytest
import torch

import penjing as pj


@pytest.mark.parametrize(
    ("name", "weights"),
    # The weight counts of the paper's tables (biases excluded).
    [("lenet300", 784 * 300 + 300 * 100 + 100 * 10), ("lenet5", 500 + 25000 + 400000 + 5000)],
)
def test_weight_counts_match_the_paper(name, weights):
    model = pj.models.create(name)
    counted = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert counted == weights


@pytest.mark.parametrize("name", sorted(pj.models.MODELS))
def test_forward_shape(name):
    model = pj.models.create(name)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_unknown_model():
    with pytest.raises(ValueError, match="lenet300"):
        pj.models.create("alexnet")
