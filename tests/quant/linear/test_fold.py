from __future__ import annotations

import pytest
import torch
from support_layers import SameConv2d
from torch import nn

import penjing as pj
from penjing.errors import PenjingWarning
from penjing.quant import fold_bn_


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize(
    ("name", "kwargs", "pairs"),
    [("vgg", {"width": 0.25}, 6), ("resnet20", {"width": 0.5}, 21)],
)
def test_folding_keeps_outputs_and_removes_every_batchnorm(name, kwargs, pairs):
    model = pj.models.create(name, **kwargs).eval()
    _randomise_bn(model)
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    folded = fold_bn_(model)
    assert len(folded) == pairs
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_linear_batchnorm1d_and_formula():
    lin, bn = nn.Linear(3, 2), nn.BatchNorm1d(2)
    _randomise_bn(bn)
    model = nn.Sequential(lin, bn).eval()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    expected_b = (b - bn.running_mean) * a + bn.bias.detach()
    x = torch.randn(5, 3)
    before = model(x)
    assert fold_bn_(model) == [("0", "1")]
    torch.testing.assert_close(lin.weight.detach(), w * a[:, None])
    torch.testing.assert_close(lin.bias.detach(), expected_b)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_pruned_zeros_stay_zero_after_folding():
    model = pj.models.create("vgg", width=0.25).eval()
    _randomise_bn(model)
    pj.prune.magnitude_(model, sparsity=0.5)
    zeros = (model.features[0].weight == 0).sum()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    fold_bn_(model)
    assert (model.features[0].weight == 0).sum() == zeros
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_batchnorm_not_after_a_layer_is_left_alone():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3)).eval()
    with pytest.warns(PenjingWarning, match="folded 0 of 1 BatchNorms; left in float: '0': its "
                      "input is not a layer's output"):
        assert fold_bn_(model) == []
    assert isinstance(model[0], nn.BatchNorm1d)


class _ConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.conv(x)))


def test_a_layer_called_twice_is_not_folded():
    """Regression: folding the BatchNorm after the first call scaled the second call too."""
    model = _ConvTwice().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 4, 4)
    before = model(x)
    with pytest.warns(PenjingWarning, match="'bn': 'conv' before it is called more than once"):
        assert fold_bn_(model) == []
    torch.testing.assert_close(model(x), before)


def test_what_cannot_be_folded_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="cannot fold BatchNorm '1' into '0': it keeps no"):
        fold_bn_(model)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    pj.quant.quantize_(model, pj.quant.weight_only())
    with pytest.raises(ValueError, match="'0'.weight carries a parametrization other than"):
        fold_bn_(model)




class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm subclass with its activation inside, as some packages write it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_subclasses_of_conv_and_batchnorm_are_folded():
    model = nn.Sequential(SameConv2d(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), SameConv2d(8, 4, 3), _Bn2d(4)).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 15, 15)
    before = model(x)
    assert fold_bn_(model) == [("0", "1"), ("3", "4")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


class _Bn2d(nn.BatchNorm2d):
    """A subclass that only renames: still a plain BatchNorm."""


def test_batchnorm_subclass_with_its_own_forward_is_named_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    with pytest.warns(PenjingWarning, match="'1': BatchNormAct2d has a forward of its own"):
        assert fold_bn_(model) == []
    torch.testing.assert_close(model(x), before)
