from __future__ import annotations

import pytest
import torch

from penjing.quant import (
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    qparams,
    quantize,
    sqnr,
)
from penjing.quant.linear.primitives import reduce_range


@pytest.mark.parametrize(
    ("bits", "signed", "lo", "hi"),
    [(8, True, -128, 127), (8, False, 0, 255), (4, True, -8, 7), (4, False, 0, 15),
     (2, True, -2, 1), (16, True, -32768, 32767)],
)
def test_integer_ranges_are_exact(bits, signed, lo, hi):
    spec = QuantSpec(bits, symmetric=False, signed=signed)
    assert (spec.qmin, spec.qmax) == (lo, hi)
    x = torch.linspace(-3, 5, 1001)
    q = quantize(x, *qparams(x.min(), x.max(), spec), spec)
    assert int(q.min()) == lo and int(q.max()) == hi  # asymmetric uses the whole range


@pytest.mark.parametrize("bits", [1, 9, 17, 0, True])
def test_bits_outside_range_is_an_error(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantSpec(bits)


def test_symmetric_has_zero_point_zero_and_exact_zero():
    x = torch.tensor([-1.0, 0.0, 0.3, 2.0])
    spec = QuantSpec(8, symmetric=True)
    scale, zero = qparams(x.min(), x.max(), spec)
    assert int(zero) == 0
    assert float(scale) == pytest.approx(2.0 / 127)
    assert fake_quantize(x, scale, zero, spec)[1] == 0


def test_asymmetric_range_always_contains_zero():
    spec = QuantSpec(8, symmetric=False, signed=False)
    scale, zero = qparams(torch.tensor(2.0), torch.tensor(6.0), spec)
    assert int(zero) == 0 and float(scale) == pytest.approx(6 / 255)
    x = torch.tensor([0.0])
    assert float(fake_quantize(x, scale, zero, spec)) == 0.0


def test_round_trip_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    for spec in (QuantSpec(8, False, False), QuantSpec(4, True, True, PerChannel(1)),
                 QuantSpec(4, True, True, PerGroup(32)), QuantSpec(8, True, True, PerChannel(0))):
        lo, hi = reduce_range(x, spec.granularity)
        scale, zero = qparams(lo, hi, spec)
        q = quantize(x, scale, zero, spec)
        back = dequantize(q, scale, zero, spec)
        assert torch.equal(back, fake_quantize(x, scale, zero, spec))
        step = scale.max()
        assert float((back - x).abs().max()) <= float(step) / 2 + 1e-6
        assert q.dtype == torch.int32


def test_per_channel_any_axis_gives_one_scale_per_slice():
    x = torch.randn(3, 5, 7)
    for axis in (0, 1, 2, -1):
        spec = QuantSpec(8, granularity=PerChannel(axis))
        lo, hi = reduce_range(x, spec.granularity)
        assert lo.shape == (x.shape[axis],)
        scale, zero = qparams(lo, hi, spec)
        y = fake_quantize(x, scale, zero, spec)
        assert y.shape == x.shape and sqnr(x, y) > 35


def test_axis_that_does_not_exist_is_an_error():
    with pytest.raises(ValueError, match="axis 3 does not exist in a tensor of shape"):
        reduce_range(torch.randn(4, 4, 4), PerChannel(3))


def test_group_wise_pads_a_short_last_group():
    x = torch.randn(4, 25)  # 25 is not a multiple of 32
    spec = QuantSpec(4, granularity=PerGroup(32))
    lo, hi = reduce_range(x, spec.granularity)
    assert lo.shape == (4, 1)
    y = fake_quantize(x, *qparams(lo, hi, spec), spec)
    assert y.shape == x.shape
    with pytest.raises(ValueError, match="group size must be a positive int"):
        PerGroup(0)


def test_smaller_groups_quantize_better():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.linspace(0.1, 3, 256)  # scale varies along the row
    errors = []
    for g in (256, 64, 32):
        spec = QuantSpec(4, granularity=PerGroup(g))
        scale, zero = qparams(*reduce_range(w, spec.granularity), spec)
        errors.append(sqnr(w, fake_quantize(w, scale, zero, spec)))
    assert errors[0] < errors[1] < errors[2]


def test_straight_through_gradient_inside_zero_outside():
    spec = QuantSpec(8, symmetric=False, signed=False)
    scale, zero = qparams(torch.tensor(0.0), torch.tensor(1.0), spec)
    x = torch.tensor([-0.5, 0.2, 0.7, 1.5], requires_grad=True)
    fake_quantize(x, scale, zero, spec).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_learnable_scale_gets_lsq_gradient():
    spec = QuantSpec(4, symmetric=True)
    scale = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.26, 5.0])  # one inside the range, one clipped at qmax = 7
    fake_quantize(x, scale, torch.tensor(0), spec).sum().backward()
    # d/ds: (round(x/s) - x/s) inside, qmax outside
    assert float(scale.grad) == pytest.approx((3 - 2.6) + 7, abs=1e-4)


def test_sqnr_of_int8_is_about_six_db_per_bit():
    torch.manual_seed(0)
    x = torch.rand(100_000) * 2 - 1
    spec8, spec4 = QuantSpec(8), QuantSpec(4)
    s8 = sqnr(x, fake_quantize(x, *qparams(-1.0, 1.0, spec8), spec8))
    s4 = sqnr(x, fake_quantize(x, *qparams(-1.0, 1.0, spec4), spec4))
    assert s8 - s4 == pytest.approx(4 * 6.02, abs=1.5)
    assert sqnr(x, x) == float("inf")


def test_granularity_must_be_a_value_type():
    with pytest.raises(TypeError, match="granularity must be"):
        QuantSpec(8, granularity="channel")
    assert PerTensor() == PerTensor() and PerChannel(1) != PerChannel(0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerGroup(2)])
def test_nan_or_inf_is_an_error_not_a_nan_scale(bad, granularity):
    """Regression: a NaN weight once gave its channel a NaN scale without a word."""
    x = torch.randn(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"must be finite, got NaN or inf .* shape \(3, 4\)"):
        reduce_range(x, granularity)


def test_channel_axis_must_be_an_int():
    with pytest.raises(TypeError, match="channel axis must be an int, got '0'"):
        PerChannel("0")
