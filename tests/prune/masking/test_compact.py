"""Convs re-expressed without their pruned stripes or shape columns: same outputs, fewer MACs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.core.counting import count_macs, count_params
from penjing.errors import UnsupportedLayerError
from penjing.prune import compact_
from penjing.prune.masking.compact import ShapeConv2d, StripeConv2d

GEOMETRIES = [  # stride, padding, dilation, bias
    (1, 1, 1, True), (2, 1, 1, False), (1, 0, 1, True), (1, 2, 2, False), (2, 0, 1, True),
]


def masked(conv: nn.Conv2d, mask: torch.Tensor) -> nn.Conv2d:
    conv = copy.deepcopy(conv)
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv


@pytest.mark.parametrize("stride,padding,dilation,bias", GEOMETRIES)
def test_stripe_conv_computes_the_masked_conv(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride, padding, dilation=dilation, bias=bias)
    keep = torch.rand(6, 3, 3) > 0.5
    reference = masked(conv, keep[:, None].float())
    x = torch.randn(2, 8, 11, 13)
    layer = StripeConv2d(reference, keep)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    assert layer.weight.shape == (int(keep.sum()), 8, 1, 1)


@pytest.mark.parametrize("stride,padding,dilation,bias", GEOMETRIES)
def test_shape_conv_computes_the_masked_conv(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride, padding, dilation=dilation, bias=bias)
    keep = torch.rand(8, 3, 3) > 0.5
    keep[:, 1, 1] = True  # one position with every channel: the gather is skipped there
    reference = masked(conv, keep[None].float())
    x = torch.randn(2, 8, 11, 13)
    layer = ShapeConv2d(reference, keep)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    assert layer.weight.shape == (6, int(keep.sum()), 1, 1)


def test_macs_fall_with_the_stripes_and_columns_removed():
    conv = nn.Conv2d(8, 6, 3, 1, 1, bias=False)
    x = torch.randn(1, 8, 10, 10)
    dense = count_macs(conv, x)
    assert dense == 100 * 6 * 8 * 9
    keep = torch.zeros(6, 3, 3, dtype=torch.bool)
    keep[:, 0, :] = True  # a third of the stripes
    stripe = StripeConv2d(masked(conv, keep[:, None].float()), keep)
    assert count_macs(stripe, x) == 12 * 12 * 18 * 8  # one 1×1 conv over the padded input
    keep = torch.zeros(8, 3, 3, dtype=torch.bool)
    keep[:4] = True
    shape = ShapeConv2d(masked(conv, keep[None].float()), keep)
    assert count_macs(shape, x) == 100 * 6 * 36


@pytest.mark.parametrize("pattern,kind", [("stripe", "stripe"), ("shape", "shape")])
def test_compact_picks_the_form_that_matches_the_mask(pattern, kind):
    torch.manual_seed(0)
    model = pj.models.create("vgg", width=0.25).eval()
    x = torch.randn(2, 1, 28, 28)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
    pj.prune.pattern_(model, pattern, sparsity=0.5, layers=convs)
    before, macs = model(x), count_macs(model, x[:1])
    done = compact_(model)
    assert done == dict.fromkeys(convs, kind)
    assert isinstance(model.features[0], nn.Conv2d)  # unmasked: left alone
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
    # half the weights of all convs but the first; the stripe form runs its 1×1 conv over
    # the padded input (30² instead of 28² positions), hence the looser bound
    assert count_macs(model, x[:1]) < (0.75 if kind == "stripe" else 0.7) * macs


def test_compact_leaves_element_masks_and_unpruned_convs_alone():
    model = pj.models.create("vgg", width=0.25)
    pj.prune.magnitude_(model, sparsity=0.5)  # scattered zeros: no whole stripe or column
    # ...except in the first conv, whose stripes are single weights (one input channel)
    assert compact_(model) == {"features.0": "stripe"}
    assert count_params(model.features[0]) == 36  # only its non-zero weights are left
    assert sum(isinstance(m, StripeConv2d | ShapeConv2d) for m in model.modules()) == 1


# StripeConv2d's index_add has distinct indices; torch's blanket warning would alarm users
@pytest.mark.filterwarnings("error:.*duplicated values in 'index'")
def test_compacted_model_exports_to_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = pj.models.create("vgg", width=0.25).eval()
    pj.prune.stripes_(model, sparsity=0.5, layers=["features.3"])
    pj.prune.pattern_(model, "shape", sparsity=0.5, layers=["features.7"])
    assert compact_(model) == {"features.3": "stripe", "features.7": "shape"}
    x = torch.randn(2, 1, 28, 28)
    from penjing.export import onnx, ort_run

    out = ort_run(onnx(model, tmp_path / "m.onnx", x), x)[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), atol=1e-4, rtol=1e-4)


def test_the_graph_keeps_channels_of_compacted_convs():
    model = pj.models.create("vgg", width=0.25).eval()
    pj.prune.stripes_(model, sparsity=0.5, layers=["features.3"])
    compact_(model)
    groups = pj.prune.groups(model, torch.randn(1, 1, 28, 28))
    assert all("features.3" not in g.modules for g in groups)
    assert any("features.10" in g.producers for g in groups)


def test_bad_input_is_an_error():
    model = pj.models.create("mobilenetv2", width=0.5)
    with pytest.raises(UnsupportedLayerError, match="layer 'features.1.block.0.0' is not a "
                       "Conv2d with groups=1"):
        compact_(model, layers=["features.1.block.0.0"])  # a depthwise conv
    with pytest.raises(ValueError, match=r"min_saving must be in \[0, 1\)"):
        compact_(model, min_saving=1.0)
