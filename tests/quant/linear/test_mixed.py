"""Mixed precision: sensitivity per layer and width, allocation under a size budget, and a
config that quantizes each layer at its chosen width."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.quant import bits_sensitivity, choose_bits, uniform_bits
from penjing.quant.linear.fakequant import get_weight_quant
from penjing.quant.linear.mixed import layer_bits


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    with torch.no_grad():  # one layer with an outlier: it suffers most at low widths
        model[2].weight[0, 0] = 4.0
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(2)]


def test_sensitivity_grows_with_width_and_leaves_the_model_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = bits_sensitivity(model, _batches(), bits=(2, 4, 8))
    assert set(table) == {"0", "2", "4"}
    for row in table.values():
        assert row[2] < row[4] < row[8]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loss = bits_sensitivity(model, _batches(), bits=(2, 8), metric="loss")
    assert all(abs(row[2]) > abs(row[8]) for row in loss.values())  # random labels: either sign


def test_choice_fits_the_budget_and_beats_uniform_at_the_same_size():
    model = _model()
    budget = uniform_bits(model, 4)
    mp = choose_bits(model, _batches(), budget, bits=(2, 4, 8))
    assert mp.size_bits <= budget
    assert mp.size_bits == sum(layer_bits(dict(model.named_modules())[n], b)
                               for n, b in mp.bits.items())
    assert mp.bits["2"] >= 4  # the outlier layer keeps more bits
    x = torch.cat([b[0] for b in _batches()])
    mixed = pj.quant.prepare(model, mp.config())
    uniform = pj.quant.prepare(model, pj.quant.weight_only(bits=4))
    ref = model(x)
    assert pj.quant.sqnr(ref, mixed(x)) >= pj.quant.sqnr(ref, uniform(x))
    for name, b in mp.bits.items():
        assert get_weight_quant(dict(mixed.named_modules())[name]).spec.bits == b
    assert "| 2 |" in mp.format() or "| 4 |" in mp.format()


def test_a_generous_budget_keeps_the_widest_and_a_tiny_one_is_an_error():
    model = _model()
    mp = choose_bits(model, _batches(), uniform_bits(model, 16), bits=(4, 16))
    assert set(mp.bits.values()) == {16}
    with pytest.raises(ValueError, match="budget"):
        choose_bits(model, _batches(), 10, bits=(2, 4))


@pytest.mark.parametrize("bits", [(3, 8), (1,), (4, 32), ()])
def test_bits_outside_the_supported_set_are_errors(bits):
    with pytest.raises(ValueError, match="bits must come from"):
        choose_bits(_model(), _batches(), 10**9, bits=bits)
