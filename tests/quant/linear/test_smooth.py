"""SmoothQuant-style smoothing (penjing.quant.linear.smooth): the float function is kept, the
Linear's input ranges flatten as sⱼ = max|Xⱼ|^α / max|Wⱼ|^(1-α) says, static INT8 gets
better on a planted outlier channel, and bad input is refused. Tiny models built here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.quant import smooth_
from penjing.quant.linear.smooth import ScaledInput

transformers = pytest.importorskip("transformers")
INIT = 0.2  # wider than BERT's 0.02, so each block changes the output (and its error shows)


def _bert(outlier: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, initializer_range=INIT),
        add_pooling_layer=False).eval()
    if outlier is not None:  # one wide channel in the LayerNorm outputs Linears read
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, nn.LayerNorm) and name != "encoder.layer.1.output.LayerNorm":
                    m.weight[5] = outlier
    return model


def _tokens(seed: int, n: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return {"input_ids": torch.randint(2, 100, (n, length), generator=g),
            "attention_mask": mask}


def _pre_ln() -> tuple[nn.Module, torch.Tensor]:
    """LayerNorm -> Linear with a few wide input channels, and its calibration inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(0.2, 3.0, 16))
        model[0].weight[[2, 11]] = 20.0
        model[0].bias.normal_(0, 0.3)
    return model, torch.randn(64, 16) * 3 + 1


def _input_absmax(model: nn.Module, linear: nn.Module, x) -> torch.Tensor:
    """Per-channel max |input| the Linear receives when `model` runs on `x`."""
    seen = []
    handle = linear.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().abs().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        pj.inputs.call(model, x)
    handle.remove()
    return torch.cat(seen).amax(0)


def _output(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return pj.inputs.first_tensor(pj.inputs.call(model, x))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_pre_ln_folds_into_layernorm_and_flattens_ranges_as_the_formula(alpha):
    model, x = _pre_ln()
    before = _output(model, x)
    x_max = _input_absmax(model, model[1], x)
    w_max = model[1].weight.detach().abs().amax(0)
    done = smooth_(model, [x], alpha=alpha)
    assert len(done) == 1 and done[0].norm == "0" and done[0].linears == ("1",)
    assert done[0].folded  # the LayerNorm feeds only the Linear: no op added
    assert isinstance(model[1], nn.Linear)
    expected = x_max.pow(alpha) / w_max.pow(1 - alpha)
    torch.testing.assert_close(done[0].scale, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(_output(model, x), before, rtol=1e-5, atol=1e-5)
    # the Linear's input ranges are now (max|X| · max|W|)^(1 - alpha)
    torch.testing.assert_close(_input_absmax(model, model[1], x),
                               (x_max * w_max).pow(1 - alpha), rtol=1e-4, atol=1e-6)


def test_half_alpha_equalizes_input_and_weight_ranges():
    model, x = _pre_ln()
    smooth_(model, [x], alpha=0.5)
    x_max = _input_absmax(model, model[1], x)
    torch.testing.assert_close(x_max, model[1].weight.detach().abs().amax(0), rtol=1e-4,
                               atol=1e-6)
    assert float(x_max.max() / x_max.min()) < 8  # from over 50 before smoothing


def test_bert_keeps_its_function_with_a_scaled_input_per_linear():
    model = _bert()
    calib = [_tokens(1), _tokens(2)]
    test = _tokens(3)
    before = _output(model, test)
    done = smooth_(model, calib, alpha=0.5)
    prefix = "encoder.layer"
    assert [(d.norm, d.linears) for d in done] == [
        ("embeddings.LayerNorm", tuple(f"{prefix}.0.attention.self.{p}"
                                       for p in ("query", "key", "value"))),
        (f"{prefix}.0.attention.output.LayerNorm", (f"{prefix}.0.intermediate.dense",)),
        (f"{prefix}.0.output.LayerNorm", tuple(f"{prefix}.1.attention.self.{p}"
                                               for p in ("query", "key", "value"))),
        (f"{prefix}.1.attention.output.LayerNorm", (f"{prefix}.1.intermediate.dense",)),
    ]
    # post-LN: each LayerNorm output is also the residual, so 1/s cannot go into it
    assert not any(d.folded for d in done)
    scaled = [n for n, m in model.named_modules() if isinstance(m, ScaledInput)]
    assert scaled == [n for d in done for n in d.linears]
    torch.testing.assert_close(_output(model, test), before, rtol=1e-4, atol=1e-5)


def test_smoothing_lowers_static_int8_error_on_an_outlier_channel():
    calib = [_tokens(1), _tokens(2)]
    test = _tokens(3)

    def error(smoothed: bool) -> float:
        model = _bert(outlier=40.0)
        ref = _output(model, test)
        if smoothed:
            smooth_(model, calib, alpha=0.5)
        q = pj.quant.ptq(model, calib, pj.quant.int8(reduce_range=True))
        return float(pj.quant.sqnr(ref, _output(q, test)))

    plain, smoothed = error(False), error(True)
    # measured 12.8 dB -> 40.8 dB: the outlier no longer sets the activation scale
    assert smoothed > plain + 20, (plain, smoothed)


def test_smoothed_bert_quantizes_after_the_scale():
    model = _bert(outlier=40.0)
    calib = [_tokens(1)]
    smooth_(model, calib)
    # a filter_fn on a transformers model (it once failed when the config was recorded)
    last = "encoder.layer.1.output.dense"
    q = pj.quant.ptq(model, calib, pj.quant.int8(filter_fn=lambda m, n: n != last))
    names = pj.quant.linear.eager.quantized_inputs(q)
    assert "encoder.layer.0.attention.self.query.linear" in names  # the Mul comes first
    assert len(names) == 11 and last not in names
    d = pj.quant.dynamic(model)
    assert isinstance(d.encoder.layer[0].attention.self.query, ScaledInput)
    assert isinstance(d.encoder.layer[0].attention.self.query.linear, pj.quant.DynamicLinear)
    ref, test = _output(model, _tokens(3)), _tokens(3)
    assert float(pj.quant.sqnr(ref, _output(d, test))) > 20


def test_smoothed_and_quantized_bert_rebuilds_from_its_model_file(tmp_path):
    model = _bert(outlier=40.0)
    config = model.config
    calib = [_tokens(1), _tokens(2)]
    smooth_(model, calib)
    q = pj.quant.ptq(model, calib, pj.quant.int8(reduce_range=True))
    pj.save(q, tmp_path / "q.safetensors")
    loaded = pj.load(tmp_path / "q.safetensors", lambda: transformers.BertModel(
        config, add_pooling_layer=False))
    assert isinstance(loaded.encoder.layer[1].attention.self.key, ScaledInput)
    test = _tokens(3)
    torch.testing.assert_close(_output(loaded, test), _output(q, test))
    # the float smoothed model, through a .pjz too
    plain = _bert(outlier=40.0)
    smooth_(plain, calib)
    pj.codec.save(plain, tmp_path / "s.pjz")
    again = pj.load(tmp_path / "s.pjz", lambda: transformers.BertModel(
        config, add_pooling_layer=False))
    torch.testing.assert_close(_output(again, test), _output(plain, test))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
def test_alpha_outside_0_1_is_refused(alpha):
    model, x = _pre_ln()
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        smooth_(model, [x], alpha=alpha)


@pytest.mark.parametrize("model, why", [
    (nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), "has no nn.LayerNorm"),
    (nn.Sequential(nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)),
     "none of its 1 Linear layers reads"),
])
def test_no_layernorm_linear_pair_is_an_error(model, why):
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"no LayerNorm -> Linear pair.*{why}"):
        smooth_(model, [torch.randn(4, 16)])
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_empty_loader_and_quantized_linear_are_refused():
    model, x = _pre_ln()
    with pytest.raises(ValueError, match="empty loader"):
        smooth_(model, [])
    pj.quant.quantize_(model, pj.quant.weight_only(bits=8))
    with pytest.raises(ValueError, match="parametrized weights"):
        smooth_(model, [x])
