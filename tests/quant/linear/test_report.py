from __future__ import annotations

import pytest
import torch

from penjing.quant import (
    PerChannel,
    QuantConfig,
    QuantSpec,
    int8,
    layer_report,
    ptq,
    weight_only,
)
from penjing.quant.linear.report import format_layers


def test_rows_follow_forward_order_with_measured_sqnr(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    rows = layer_report(model, ptq(model, calib, int8()), calib[0])
    assert [r.name for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    for r in rows:
        assert r.weight == "int8/ch" and 0 < r.scale_min <= r.scale_max
        assert r.weight_sqnr > 38  # 8 bits per channel: ~6 dB per bit, minus the peaks
        assert r.output_scale > 0 and r.output_sqnr > 30
    # a + w + ⌈log2(fan-in)⌉: conv1 5·5 taps, conv2 20·5·5, fc1 800, fc2 500
    assert [r.accumulator_bits for r in rows] == [8 + 8 + 5, 8 + 8 + 9, 8 + 8 + 10, 8 + 8 + 9]
    table = format_layers(rows)
    assert table.splitlines()[0].split()[:3] == ["layer", "type", "weight"]
    assert f"{rows[2].weight_sqnr:.1f}" in table.splitlines()[4]


def test_int4_costs_about_24_db_of_weight_sqnr(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    eight = layer_report(model, ptq(model, calib, int8()), calib[0])
    four = layer_report(model, ptq(model, None, weight_only(bits=4, group_size=32)), calib[0])
    for a, b in zip(eight, four, strict=True):
        assert b.weight == "int4/g32" and b.output_scale is None
        assert a.weight_sqnr - b.weight_sqnr == pytest.approx(4 * 6.02, abs=6)
        assert b.output_sqnr < a.output_sqnr


def test_float_model_is_not_changed_by_the_report(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_report(model, ptq(model, calib, int8()), calib[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sixteen_bit_operands_would_overflow_int32_accumulators(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    wide = QuantSpec(16, symmetric=False, signed=False)
    q = ptq(model, calib, QuantConfig(weight=QuantSpec(16, granularity=PerChannel(0)),
                                      activation=wide))
    rows = layer_report(model, q, calib[0])
    assert all(r.accumulator_bits > 32 for r in rows)
    assert all(r.weight_sqnr > 80 for r in rows)  # 16 bits: ~96 dB minus the peaks


def test_each_row_says_where_the_output_quantizer_sits(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    rows = layer_report(model, ptq(model, calib, int8()), calib[0])
    # conv1 and conv2 feed a max-pool, fc1 a ReLU (its quantizer goes after it), fc2 nothing
    assert [r.output for r in rows] == ["layer output", "layer output", "fused relu",
                                        "layer output"]
    table = format_layers(rows).splitlines()
    assert table[0].endswith("output quantizer") and table[4].endswith("fused relu")
    four = layer_report(model, ptq(model, None, weight_only(bits=4, group_size=32)), calib[0])
    assert [r.output for r in four] == ["none"] * 4
