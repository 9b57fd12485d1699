"""Data-free quantization: cross-layer equalization keeps the float function and equalizes
ranges, absorption is exact where the BN statistics hold, bias correction removes the
expected output shift, and pairs that do not qualify are named."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from support_layers import SameConv2d
from torch import nn
from torch.nn import functional as F

import penjing as pj
from penjing.errors import PenjingWarning
from penjing.quant import QuantConfig, QuantSpec, dfq, equalize
from penjing.quant.datafree.dfq import _clipped_mean, input_means
from penjing.quant.datafree.equalize import ChannelClip, sees_padding


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            m.weight.data.copy_(torch.rand(n, generator=g) * 3 + 0.05)
            m.bias.data.copy_(torch.randn(n, generator=g))




class Separable(nn.Module):
    """stem → ReLU6 → depthwise → ReLU6 (one shared module, called twice) → pointwise."""

    def __init__(self, conv=nn.Conv2d) -> None:
        super().__init__()
        self.stem = conv(3, 8, 3, padding=1, bias=False) if conv is nn.Conv2d else conv(
            3, 8, 3, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = conv(8, 8, 3, padding=1, groups=8, bias=False) if conv is nn.Conv2d else conv(
            8, 8, 3, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = conv(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        x = self.act(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _spread_weights(model: nn.Module) -> None:
    """Channels of very different ranges: what makes per-tensor quantization fail."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            factor = torch.exp(torch.randn(m.weight.shape[0], generator=g) * 1.5)
            m.weight.data.mul_(factor.reshape(-1, *[1] * (m.weight.dim() - 1)))


def _ranges(gm, first, second):
    a, b = gm.get_submodule(first), gm.get_submodule(second)
    r1 = a.weight.detach().abs().flatten(1).amax(1)
    w = b.weight.detach()
    if isinstance(b, nn.Linear):
        r2 = w.abs().amax(0)
    elif b.groups == w.shape[0] and w.shape[1] == 1:
        r2 = w.abs().flatten(1).amax(1)
    else:
        r2 = w.abs().transpose(0, 1).flatten(1).amax(1)
    return r1, r2


@pytest.mark.parametrize("conv", [nn.Conv2d, SameConv2d])
def test_equalization_keeps_the_float_function_and_equalizes_ranges(conv):
    model = Separable(conv).eval()
    _randomise_bn(model)
    _spread_weights(model)
    x = torch.randn(4, 3, 12, 12)
    eq, info = equalize(model, absorb=False, iterations=300, tol=1e-6)
    assert [(p.first, p.second) for p in info.pairs] == [("stem", "dw"), ("dw", "pw"),
                                                        ("pw", "fc")]
    torch.testing.assert_close(eq(x), model(x), atol=1e-5, rtol=1e-5)
    for p in info.pairs:  # converged: r1 / s == r2 · s holds as r1' == r2'
        r1, r2 = _ranges(eq, p.first, p.second)
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-7)
    assert sum(isinstance(m, ChannelClip) for m in eq.modules()) == 2


def test_one_pair_uses_the_paper_scale_exactly():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    _spread_weights(model)
    r1 = model[0].weight.detach().abs().flatten(1).amax(1)
    r2 = model[2].weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    eq, info = equalize(model, absorb=False, iterations=1)
    s = info.pairs[0].scale
    torch.testing.assert_close(s, (r1 * r2).sqrt() / r2)
    new1, new2 = _ranges(eq, "0", "2")
    torch.testing.assert_close(new1, r1 / s)
    torch.testing.assert_close(new2, r2 * s)
    torch.testing.assert_close(new1, new2)


def test_per_tensor_quantization_error_drops_after_equalization():
    model = Separable().eval()
    _randomise_bn(model)
    _spread_weights(model)
    x = torch.randn(16, 3, 12, 12)
    config = QuantConfig(weight=QuantSpec(8), activation=None)
    plain = dfq(model, config, equalization=False, bias_correction=None)
    equalized = dfq(model, config, bias_correction=None, absorb=False)
    ref = model(x)
    assert pj.quant.sqnr(ref, equalized(x)) > pj.quant.sqnr(ref, plain(x)) + 6


def test_absorption_is_exact_where_the_bn_statistics_hold():
    conv1, conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1)
    with torch.no_grad():
        conv1.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
        conv1.bias.zero_()
    bn = nn.BatchNorm2d(4)
    bn.weight.data.copy_(torch.tensor([0.5, 1.0, 0.2, 2.0]))
    bn.bias.data.copy_(torch.tensor([5.0, 1.0, 3.0, -1.0]))
    model = nn.Sequential(conv1, bn, nn.ReLU(), conv2).eval()
    eq, info = equalize(model, iterations=1)
    c = info.pairs[0].absorbed
    stats_c = (torch.tensor([5.0, 1.0, 3.0, -1.0]) - 3 * torch.tensor([0.5, 1, 0.2, 2])).clamp(0)
    s = info.pairs[0].scale
    torch.testing.assert_close(c * s, stats_c)  # c in the equalized channel's units
    x = torch.randn(64, 4, 5, 5).clamp(-2.9, 2.9)  # every pre-activation above β − 3σ
    torch.testing.assert_close(eq(x), model(x), atol=1e-5, rtol=1e-5)
    assert float(eq.get_submodule("0").bias.detach().abs().max()) < float(
        (bn.bias.detach() / s).abs().max())


def test_absorption_skips_a_second_layer_that_sees_padding():
    assert sees_padding(nn.Conv2d(2, 2, 3, padding=1))
    assert sees_padding(SameConv2d(2, 2, 3))
    assert not sees_padding(nn.Conv2d(2, 2, 3))
    assert not sees_padding(SameConv2d(2, 2, 1))
    model = Separable().eval()
    _randomise_bn(model)
    for bn in (model.bn0, model.bn1):  # high biases: β − 3σ > 0 in every channel
        bn.bias.data.fill_(4.0)
        bn.weight.data.fill_(0.5)
    _, info = equalize(model)
    absorbed = {p.second for p in info.pairs if p.absorbed is not None}
    assert "dw" not in absorbed and "pw" in absorbed


def test_clipped_normal_mean_matches_sampling():
    g = torch.Generator().manual_seed(3)
    mu, sigma = torch.tensor([-1.0, 0.5, 3.0, 7.0]), torch.tensor([1.0, 2.0, 0.5, 2.0])
    lo, hi = torch.zeros(4), torch.tensor([6.0, math.inf, 6.0, 6.0])
    x = mu + sigma * torch.randn(400_000, 4, generator=g)
    sampled = torch.clamp(x, lo, hi).mean(0)
    torch.testing.assert_close(_clipped_mean(mu, sigma, lo, hi), sampled, atol=0.01, rtol=0)


def _gaussian_model() -> tuple[nn.Module, torch.Tensor]:
    """A layer whose input really is N(β, γ²) per channel (BN on standard normal inputs)
    before a ReLU, so analytic bias correction has true statistics to work from."""
    conv1 = nn.Conv2d(6, 6, 1, bias=False)
    with torch.no_grad():
        conv1.weight.copy_(torch.eye(6).reshape(6, 6, 1, 1))
    bn = nn.BatchNorm2d(6)
    bn.weight.data.copy_(torch.linspace(0.5, 2, 6))
    bn.bias.data.copy_(torch.linspace(-1, 2, 6))
    conv2 = nn.Conv2d(6, 8, 1)
    model = nn.Sequential(conv1, bn, nn.ReLU(), conv2).eval()
    return model, torch.randn(256, 6, 4, 4)


@torch.no_grad()
def _mean_shift(model, q, x) -> float:
    return float((q(x) - model(x)).mean((0, 2, 3)).abs().mean())


def test_analytic_bias_correction_removes_the_expected_output_shift():
    model, x = _gaussian_model()
    config = QuantConfig(weight=QuantSpec(3), activation=None)
    plain = dfq(model, config, bias_correction=None, equalization=False)
    corrected = dfq(model, config, bias_correction="analytic", equalization=False)
    before, after = _mean_shift(model, plain, x), _mean_shift(model, corrected, x)
    assert after < 0.2 * before
    eq, info = equalize(model, pairs=[], absorb=False)  # BN folded, channels as they were
    means = input_means(eq, info.stats)
    torch.testing.assert_close(means["3"], F.relu(model[1](model[0](x))).mean((0, 2, 3)),
                               atol=0.1, rtol=0)  # 4,096 samples per channel


def test_empirical_bias_correction_removes_the_output_shift():
    model, x = _gaussian_model()
    config = QuantConfig(weight=QuantSpec(3), activation=None)
    plain = dfq(model, config, bias_correction=None, equalization=False)
    corrected = dfq(model, config, calib_loader=[x[:128]], bias_correction="empirical",
                    equalization=False)
    assert _mean_shift(model, corrected, x[128:]) < 0.2 * _mean_shift(model, plain, x[128:])


def test_mobilenet_dfq_keeps_function_and_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = pj.models.create("mobilenetv2", width=0.25, config=((1, 8, 1, 1), (6, 8, 2, 2)),
                             last_channels=16).eval()
    _randomise_bn(model)
    x = torch.randn(8, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PenjingWarning)  # the residual branches
        eq, info = equalize(model, absorb=False)
        q = dfq(model, pj.quant.int8(per_channel=False), calib_loader=[x])
    assert len(info.pairs) >= 5
    torch.testing.assert_close(eq(x), model(x), atol=1e-4, rtol=1e-4)
    path = pj.export.onnx(q, tmp_path / "dfq.onnx", x[:1])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    assert pj.quant.sqnr(q(x), torch.from_numpy(out)) > 20


def test_a_pair_through_a_non_relu_activation_is_named_and_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                          nn.Conv2d(4, 2, 1)).eval()
    with pytest.warns(PenjingWarning, match=r"'0' → '2'.*silu|'0' → '2'.*SiLU"):
        _, info = equalize(model)
    assert [(p.first, p.second) for p in info.pairs] == [("2", "4")]
    with pytest.raises(ValueError, match=r"'0' → '2'.*not ReLU-family"):
        equalize(model, pairs=[("0", "2")])
    with pytest.raises(ValueError, match="not a pair"):
        equalize(model, pairs=[("0", "4")])


def test_a_branch_between_layers_is_named():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            return self.b(y) + self.c(y)

    with pytest.warns(PenjingWarning, match=r"'a' → '.'.*branch"):
        _, info = equalize(Branch())
    assert info.pairs == []
    with pytest.raises(ValueError, match="branch"):
        equalize(Branch(), pairs=[("a", "b")])


def test_nothing_to_equalize_is_a_warning_not_a_silent_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 2))
    with pytest.warns(PenjingWarning, match="no layer pair"):
        equalize(model)


def test_analytic_bias_correction_without_batchnorm_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="BatchNorm"):
        dfq(model, bias_correction="analytic")
    with pytest.raises(ValueError, match="bias_correction"):
        dfq(model, bias_correction="magic")
    with pytest.raises(ValueError, match="calib_loader"):
        dfq(model, bias_correction="empirical")
