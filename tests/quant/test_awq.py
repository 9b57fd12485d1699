"""AWQ: scales folded where the graph allows (and nowhere else), a lower output error than
round-to-nearest on the same grid, weights on the grid their scales give, and a model file
that rebuilds it."""

from __future__ import annotations

import pytest
import torch
from support_decoders import calib, correlated_inputs, logits, tiny
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.quant import AWQConfig, GPTQConfig, quantize_
from penjing.quant.awq import round_to_grid
from penjing.quant.gptq import gptq_matrix
from penjing.quant.linear.primitives import fake_quantize

transformers = pytest.importorskip("transformers")


class OffsetNorm(nn.Module):
    """A norm computing x̂·(1 + w), as Gemma's does: dividing w does not divide the output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def salient(norm: nn.Module) -> nn.Sequential:
    """norm → Linear, with a few input channels 30× larger than the rest (what AWQ is for)."""
    torch.manual_seed(0)
    model = nn.Sequential(norm, nn.Linear(64, 48))
    with torch.no_grad():
        if isinstance(norm, nn.LayerNorm):
            norm.weight.copy_(torch.ones(64))
            norm.weight[:4] = 30.0
    return model.eval()


def batches(seed: int = 0) -> list[torch.Tensor]:
    return [correlated_inputs(128, 64, seed=seed + s) for s in range(4)]


def output_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).square().mean())


def test_round_to_grid_is_the_grid_gptq_rounds_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(12, 40)  # 40 columns: a last group of 8 out of 16
    config = GPTQConfig(3, 16, rounding="nearest")
    expected, scale, zero = gptq_matrix(w, torch.eye(40, dtype=torch.float64), config)
    values, s, z = round_to_grid(w, config.spec, 16)
    assert torch.equal(values, expected)
    assert torch.equal(s, scale) and torch.equal(z.to(torch.int32), zero)
    clipped, _, _ = round_to_grid(w, config.spec, 16, torch.full((12,), 0.7))
    assert clipped.abs().amax() < values.abs().amax()


def test_awq_folds_its_scale_into_the_norm_and_beats_round_to_nearest():
    reference = salient(nn.LayerNorm(64))
    awq, nearest = salient(nn.LayerNorm(64)), salient(nn.LayerNorm(64))
    done = quantize_(awq, AWQConfig(3, 16), calib=batches())
    quantize_(nearest, GPTQConfig(3, 16, rounding="nearest"))
    assert done["1"]["folded_into"] == "0" and done["1"]["alpha"] > 0
    assert not torch.equal(awq[0].weight, reference[0].weight)  # the norm took 1 / s
    held_out = correlated_inputs(256, 64, seed=99)
    assert output_error(awq, reference, held_out) < 0.75 * output_error(nearest, reference,
                                                                       held_out)
    quantizer = pj.quant.get_weight_quant(awq[1])  # the weights lie on the stored grid
    w = awq[1].weight.detach()
    assert torch.equal(fake_quantize(w, quantizer.scale, quantizer.zero_point,
                                     AWQConfig(3, 16).spec), w)


def test_awq_leaves_a_norm_alone_when_dividing_its_weight_does_not_divide_its_output():
    reference = salient(OffsetNorm(64))
    model = salient(OffsetNorm(64))
    done = quantize_(model, AWQConfig(4, 16), calib=batches())
    assert done["1"]["folded_into"] is None
    assert torch.equal(model[0].weight, reference[0].weight)
    x = correlated_inputs(64, 64, seed=5)
    with torch.no_grad():
        assert output_error(model, reference, x) < 0.05 * float(reference(x).square().mean())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_awq_quantizes_every_block_linear_of_a_decoder_and_folds_where_it_can(kind):
    model, reference = tiny(kind), tiny(kind)
    nearest = tiny(kind)
    done = quantize_(model, AWQConfig(3, 16, grid=10), calib=calib())
    quantize_(nearest, GPTQConfig(3, 16, rounding="nearest"))
    quantized = sorted(n for n, m in model.named_modules() if pj.quant.get_weight_quant(m))
    linears = sorted(n for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and "lm_head" not in n)
    assert quantized == linears == sorted(done)
    for name, d in done.items():  # folds land only on norms or a gated MLP's up projection
        target = d["folded_into"]
        if target is not None:
            kind_of = type(model.get_submodule(target)).__name__
            assert "Norm" in kind_of or target.endswith("up_proj"), (name, target)
        if name.endswith(("o_proj", "out_proj")):  # after attention: nothing to fold into
            assert target is None
    assert any(d["folded_into"] for d in done.values())
    ids = calib(4, 24, seed=0)
    err = sum((logits(model, i) - logits(reference, i)).square().mean() for i in ids)
    err_nearest = sum((logits(nearest, i) - logits(reference, i)).square().mean() for i in ids)
    assert err < err_nearest


def test_awq_does_not_fold_into_a_norm_that_a_float_layer_also_reads():
    model = tiny("llama")
    keep = "model.layers.0.self_attn.k_proj"
    done = quantize_(model, AWQConfig(4, 16, layers=lambda m, n: n != keep), calib=calib(4))
    assert keep not in done
    q = done["model.layers.0.self_attn.q_proj"]
    assert q["folded_into"] is None  # k_proj reads the same norm and stays float
    assert done["model.layers.1.self_attn.q_proj"]["folded_into"] is not None \
        or done["model.layers.1.self_attn.q_proj"]["alpha"] == 0.0


def test_an_awq_model_file_loads_to_the_same_outputs(tmp_path):
    model = tiny("llama")
    quantize_(model, AWQConfig(4, 16, grid=5), calib=calib(4))
    pj.save(model, tmp_path / "q.safetensors")
    loaded = pj.load(tmp_path / "q.safetensors", lambda: tiny("llama"))
    ids = calib(1, 20, seed=3)[0]
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_awq_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="AWQ scales each layer by its inputs"):
        quantize_(tiny("llama"), AWQConfig())
    with pytest.raises(UnsupportedLayerError, match="AWQ stores nn.Linear weights"):
        quantize_(tiny("gpt2"), AWQConfig(4, 16), calib=calib(2))
    with pytest.raises(ValueError, match="grid must be a positive int"):
        AWQConfig(grid=0)
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        AWQConfig(bits=9)
