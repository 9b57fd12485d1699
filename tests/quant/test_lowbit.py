"""Binary, ternary and power-of-two weights: the formulas, the STE, INQ's shares, XNOR's
input scale, and packed .pjz storage."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import penjing as pj
from penjing.core.parametrize import finalize_
from penjing.quant import lowbit


def test_bwn_scale_is_the_mean_magnitude_per_output_channel():
    w = torch.randn(6, 3, 3, 3)
    q = lowbit.binarize(w)
    alpha = w.abs().reshape(6, -1).mean(1)
    torch.testing.assert_close(q.abs(), alpha.reshape(6, 1, 1, 1).expand_as(w))
    assert torch.equal(torch.sign(q), torch.where(w >= 0, 1.0, -1.0))
    assert torch.equal(lowbit.binarize(w, scaled=False).abs(), torch.ones_like(w))


def test_twn_threshold_and_scale_over_the_survivors():
    w = torch.randn(5, 40)
    q = lowbit.ternarize(w)
    for row, qrow in zip(w, q, strict=True):
        delta = 0.7 * row.abs().mean()
        keep = row.abs() > delta
        assert torch.equal(qrow != 0, keep)
        torch.testing.assert_close(qrow[keep].abs(), row[keep].abs().mean().expand(
            int(keep.sum())))
        assert torch.equal(torch.sign(qrow[keep]), torch.sign(row[keep]))
    torch.testing.assert_close(lowbit.ternary_threshold(w), 0.7 * w.abs().mean(1))


@pytest.mark.parametrize("method", ["bwn", "binaryconnect"])
def test_straight_through_gradient_reaches_the_float_weight(method):
    layer = nn.Linear(8, 4)
    model = nn.Sequential(nn.Linear(8, 8), layer, nn.Linear(4, 2))
    added = pj.quant.binarize_(model, method)
    assert list(added) == ["1"]  # first and last stay float
    x = torch.randn(3, 8)
    h = model[0](x).detach().requires_grad_(False)
    out = layer(h)
    out.sum().backward()
    expected = torch.ones(3, 4).T @ h  # d(sum)/dW of a linear layer, passed straight through
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected)


def test_xnor_binarizes_inputs_and_scales_by_k():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), conv, nn.Conv2d(4, 2, 1))
    added = pj.quant.binarize_(model, "xnor")
    x = torch.randn(2, 3, 6, 6)
    wb = lowbit.binarize(conv.parametrizations.weight.original.detach())
    k = F.conv2d(x.abs().mean(1, keepdim=True), torch.ones(1, 1, 3, 3) / 9, padding=1)
    expected = F.conv2d(torch.where(x >= 0, 1.0, -1.0), wb, None, padding=1) * k + \
        conv.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), expected)
    added["1"].inputs.remove()
    torch.testing.assert_close(conv(x), F.conv2d(x, wb, conv.bias, padding=1))


def test_xnor_refuses_a_layer_with_its_own_forward_and_changes_nothing():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), Odd(4, 4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="own"):
        pj.quant.binarize_(model, "xnor")
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("bits", [3, 5])
def test_inq_quantizes_exactly_the_share_asked_to_powers_of_two(bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 7))
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    added = pj.quant.log2_(model, bits, fraction=0.5)
    for (name, p), w in zip(added.items(), before, strict=True):
        assert int(p.frozen.sum()) == round(0.5 * w.numel()), name
        free_max = w.abs()[~p.frozen].max()
        assert bool((w.abs()[p.frozen] >= free_max).all())  # largest magnitudes first
    x, y = torch.randn(64, 30), torch.randint(0, 7, (64,))
    pj.train.fit(model, [(x, y)], epochs=2, lr=1e-2, progress=False)
    frozen_before = {n: (p.values.clone(), p.frozen.clone()) for n, p in added.items()}
    pj.quant.inq_step_(model, 0.875)
    for name, p in added.items():
        n2, n1 = p.exponents
        assert n1 - n2 + 1 == 2 ** (bits - 2)
        numel = p.frozen.numel()
        assert int(p.frozen.sum()) == round(0.875 * numel)
        old_values, old_frozen = frozen_before[name]
        assert torch.equal(p.values[old_frozen], old_values[old_frozen])  # stays frozen
        v = p.values[p.frozen]
        nonzero = v[v != 0].abs()
        exps = torch.log2(nonzero)
        assert torch.equal(exps, exps.round())
        assert bool(((exps >= n2) & (exps <= n1)).all())
    pj.quant.inq_step_(model, 1.0)
    finalize_(model)
    for m in (model[0], model[2]):
        w = m.weight.detach()
        mag = w[w != 0].abs()
        assert torch.equal(torch.log2(mag), torch.log2(mag).round())


def test_log2_levels_follow_inq():
    w = torch.tensor([0.9, -0.6, 0.3, 0.01, -0.2])
    n2, n1 = lowbit.log2_exponents(w, 4)  # n1 = floor(log2(4·0.9/3)) = 0, 4 exponents
    assert (n2, n1) == (-3, 0)
    q = lowbit.log2_quantize(w, (n2, n1))
    assert torch.equal(q, torch.tensor([1.0, -0.5, 0.25, 0.0, -0.25]))


def test_bits_outside_the_supported_set_are_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="bits"):
        pj.quant.log2_(model, bits=1)
    with pytest.raises(ValueError, match="bits"):
        pj.quant.log2_(model, bits=9)
    with pytest.raises(ValueError, match="binary method"):
        pj.quant.binarize_(model, "xor")
    with pytest.raises(ValueError, match="threshold"):
        pj.quant.ternarize_(model, threshold=3.0, first=True)
    with pytest.raises(ValueError, match="schedule"):
        pj.quant.inq_(model, [], schedule=(0.5, 0.4, 1.0))
    with pytest.raises(ValueError, match="schedule"):
        pj.quant.inq_(model, [], schedule=(0.5, 0.9))


def test_inq_runs_its_default_schedule_to_all_powers_of_two():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    batch = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
    added = pj.quant.inq_(model, batch, bits=4, epochs=1, progress=False)
    assert all(bool(p.frozen.all()) for p in added.values())


@pytest.mark.parametrize(("apply", "bits"), [
    (lambda m: pj.quant.binarize_(m, "bwn", first=True, last=True), 1),
    (lambda m: pj.quant.ternarize_(m, first=True, last=True), 2),
])
def test_binary_and_ternary_models_save_packed_and_load_bit_exact(tmp_path, apply, bits):
    model = pj.models.create("lenet5")
    apply(model)
    finalize_(model)
    path = tmp_path / "m.pjz"
    pj.codec.save(model, path)
    state = pj.codec.load(path)
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t + 0.0), name
    rows = {r.name: r for r in pj.codec.inspect(path).layers}
    for name in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):
        w = model.state_dict()[name]
        assert rows[name].encoding == "packed"
        assert rows[name].total_bytes == w.shape[0] * 4 + math.ceil(w.numel() * bits / 8)


def test_inq_model_saves_as_power_of_two_codes(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    pj.quant.log2_(model, 5, fraction=1.0)
    finalize_(model)
    path = tmp_path / "m.pjz"
    pj.codec.save(model, path)
    state = pj.codec.load(path)
    assert torch.equal(state["0.weight"], model[0].weight.detach() + 0.0)
    row = next(r for r in pj.codec.inspect(path).layers if r.name == "0.weight")
    assert row.encoding in ("dense", "sparse") and row.codebook_bytes <= 4 * 16
    assert row.weight_bytes <= math.ceil(64 * 32 * 5 / 8)
