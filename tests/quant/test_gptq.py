"""GPTQ: lower layer error than round-to-nearest on the same grid, weights exactly on that
grid, block by block through real decoder layouts, and a model file that rebuilds it."""

from __future__ import annotations

import pytest
import torch
from support_decoders import calib, correlated_inputs, logits, tiny
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.quant import GPTQConfig, quantize_
from penjing.quant.gptq import gptq_matrix
from penjing.quant.linear.primitives import fake_quantize

transformers = pytest.importorskip("transformers")


def layer_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - q) @ x.t()).square().mean())


@pytest.mark.parametrize("bits, group", [(4, 32), (3, None), (4, None)])
def test_gptq_beats_round_to_nearest_on_the_same_grid(bits, group):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    x = correlated_inputs(512, 128)
    h = (x.t() @ x / len(x)).double()
    gptq, _, _ = gptq_matrix(w, h, GPTQConfig(bits, group))
    nearest, _, _ = gptq_matrix(w, h, GPTQConfig(bits, group, rounding="nearest"))
    assert layer_error(w, gptq, x) < 0.7 * layer_error(w, nearest, x)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_weights_lie_on_the_grid_its_scales_give(act_order):
    torch.manual_seed(1)
    w, x = torch.randn(16, 64), correlated_inputs(256, 64)
    config = GPTQConfig(4, 16, act_order=act_order)
    q, scale, zero = gptq_matrix(w, (x.t() @ x).double(), config)
    assert scale.shape == zero.shape == (16, 4)
    assert torch.equal(fake_quantize(q, scale, zero, config.spec), q)
    for row in q.view(16, 4, 16):
        assert all(g.unique().numel() <= 16 for g in row)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_gptq_quantizes_every_block_linear_of_a_decoder_and_beats_nearest(kind):
    model = tiny(kind)
    ids = calib(1, 24, seed=7)[0]
    reference = logits(model, ids)
    nearest = tiny(kind)
    quantize_(nearest, GPTQConfig(3, 16, rounding="nearest"), calib=calib())
    quantize_(model, GPTQConfig(3, 16), calib=calib())
    quantized = [n for n, m in model.named_modules() if pj.quant.get_weight_quant(m)]
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lm_head" not in n]
    assert sorted(quantized) == sorted(linears)  # every block Linear; the head stays float
    err = (logits(model, ids) - reference).square().mean()
    err_nearest = (logits(nearest, ids) - reference).square().mean()
    assert err < err_nearest


def test_a_gptq_model_file_loads_to_the_same_outputs(tmp_path):
    model = tiny("llama")
    quantize_(model, GPTQConfig(4, 16), calib=calib())
    pj.save(model, tmp_path / "q.safetensors")
    loaded = pj.load(tmp_path / "q.safetensors", lambda: tiny("llama"))
    ids = calib(1, 20, seed=3)[0]
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_gptq_on_a_model_without_blocks_treats_it_as_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = [correlated_inputs(64, 32, seed=s) for s in range(4)]
    errors = quantize_(model, GPTQConfig(4, None, layers=["0"]), calib=x)
    assert list(errors) == ["0"] and pj.quant.get_weight_quant(model[2]) is None


def test_gptq_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="GPTQ measures every layer on calibration data"):
        quantize_(tiny("llama"), GPTQConfig())
    with pytest.raises(UnsupportedLayerError, match="GPTQ stores nn.Linear weights"):
        quantize_(tiny("gpt2"), GPTQConfig(4, 16), calib=calib(2))
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        GPTQConfig(bits=1)
    with pytest.raises(ValueError, match="rounding must be 'gptq' or 'nearest'"):
        GPTQConfig(rounding="stochastic")
    with pytest.raises(ValueError, match="needs calibration batches, got none"):
        quantize_(tiny("llama"), GPTQConfig(), calib=[])
    # round-to-nearest reads no inputs
    assert quantize_(tiny("llama"), GPTQConfig(4, 16, rounding="nearest"))
