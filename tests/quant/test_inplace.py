"""`pj.quant.quantize_(model, config)`: the config's type picks the method, weights change
in place, and a config that needs calibration is sent to `ptq` with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.quant import BinaryConfig, KMeansConfig, Log2Config, TernaryConfig, quantize_


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def distinct(layer: nn.Module) -> int:
    return int(layer.weight.detach().unique().numel())


def test_kmeans_config_shares_weights_in_every_chosen_layer():
    model = mlp()
    infos = quantize_(model, KMeansConfig(bits=2))
    assert set(infos) == {"0", "2", "4"}
    assert all(distinct(model[i]) <= 4 for i in (0, 2, 4))
    per_layer = mlp()
    quantize_(per_layer, KMeansConfig(bits={"2": 3}))
    assert distinct(per_layer[2]) <= 8 and distinct(per_layer[0]) == 12 * 16


def test_low_bit_configs_leave_the_first_and_last_layers_as_the_papers_do():
    binary = mlp()
    added = quantize_(binary, BinaryConfig("bwn"))
    assert list(added) == ["2"]  # first and last stay float by default
    rows = binary[2].weight.detach().abs()
    assert torch.allclose(rows, rows[:, :1].expand_as(rows))  # ±α per output channel
    ternary = mlp()
    added = quantize_(ternary, TernaryConfig(layers=["0", "2"], first=True, last=True))
    assert list(added) == ["0", "2"]
    assert all(row.unique().numel() <= 3 for row in ternary[0].weight.detach())  # {−α, 0, α}
    assert distinct(ternary[4]) == 16 * 3
    log2 = mlp()
    quantize_(log2, Log2Config(bits=4, layers=pj.layers.names("4")))
    magnitudes = log2[4].weight.detach().abs()
    exps = torch.log2(magnitudes[magnitudes > 0])
    assert torch.equal(exps, exps.round())


def test_weight_only_config_through_quantize_matches_the_integer_grid():
    model = mlp()
    quantize_(model, pj.quant.weight_only(bits=4, group_size=4))
    w = model[2].weight.detach().view(16, 4, 4)
    scale = w.abs().amax(dim=2, keepdim=True) / 7
    assert torch.allclose(w / scale, (w / scale).round(), atol=1e-4)


def test_a_config_that_needs_calibration_is_sent_to_ptq():
    with pytest.raises(ValueError, match=r"use q = pj.quant.ptq\(model, calib_loader, config\)"):
        quantize_(mlp(), pj.quant.int8())
    with pytest.raises(TypeError, match="quantize_ takes one of QuantConfig, KMeansConfig"):
        quantize_(mlp(), pj.prune.MagnitudeConfig(sparsity=0.5))


@pytest.mark.parametrize("make, message", [
    (lambda: KMeansConfig(bits=0), r"bits must be in 1..16, got 0"),
    (lambda: KMeansConfig(init="kmeans++"), "init must be one of"),
    (lambda: KMeansConfig(bits={"0": 4}, layers=["0"]), "not both"),
    (lambda: BinaryConfig("sign"), "method must be one of"),
    (lambda: TernaryConfig(threshold=0), "threshold must be a number > 0"),
    (lambda: Log2Config(bits=1), "power-of-two bits must be an int in 2..8"),
    (lambda: Log2Config(fraction=1.5), r"fraction must be in \[0, 1\]"),
])
def test_a_quant_config_refuses_a_bad_value_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_name_that_is_not_a_layer_is_an_error_before_anything_changes():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no layer named 'fc9'"):
        quantize_(model, TernaryConfig(layers=["fc9"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_recipe_stage_and_the_cli_flags_build_the_same_quant_config():
    from penjing.cli import build_parser
    from penjing.recipes.schema import QuantPTQ, QuantWeightOnly
    from penjing.recipes.stages import _linear_config

    args = build_parser().parse_args(
        ["quantize", "lenet5", "--weights", "w.safetensors", "--granularity", "tensor",
         "--observer", "entropy", "--skip", "fc3", "--skip-first", "--reduce-range"])
    flags = pj.quant.linear.config.make_config(
        bits=args.bits, granularity=args.granularity, observer=args.observer,
        skip=tuple(args.skip), skip_first=args.skip_first, reduce_range=args.reduce_range)
    stage = QuantPTQ(stage="quantize", method="ptq", granularity="tensor", observer="entropy",
                     skip=["fc3"], skip_first=True, reduce_range=True)
    assert _linear_config(stage) == flags
    assert flags.weight.bits == 7 and not flags.first and flags.layers == {"fc3": False}
    weights = _linear_config(QuantWeightOnly(stage="quantize", method="weight_only", bits=4,
                                           group_size=32))
    assert weights == pj.quant.weight_only(4, 32)


def test_the_kmeans_stage_takes_every_field_of_its_config():
    """A recipe's k-means stage and KMeansConfig cannot drift apart (the seed is the
    recipe's own)."""
    import dataclasses

    from penjing.recipes.schema import QuantKMeans

    for field in dataclasses.fields(KMeansConfig):
        if field.name == "seed":
            continue
        assert field.name in QuantKMeans.model_fields, field.name
        if field.name != "layers":
            assert QuantKMeans.model_fields[field.name].default == field.default, field.name
