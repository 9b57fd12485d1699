from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.quant import (
    OBSERVERS,
    ActQuant,
    PerGroup,
    QuantConfig,
    QuantSpec,
    activation_quantizers,
    get_weight_quant,
    int8,
    ptq,
    quantize_,
    sqnr,
    weight_only,
)


@pytest.mark.parametrize("observer", sorted(OBSERVERS))
def test_int8_ptq_keeps_lenet5_accuracy(lenet5_trained, observer):
    model, _, test, calib, fp32 = lenet5_trained
    q = ptq(model, calib, int8(observer=observer))
    assert pj.train.evaluate(q, test) >= fp32 - 0.01


def test_ptq_leaves_the_input_model_alone(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptq(model, calib, int8())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_quantizers_sit_around_every_layer_and_reuse_scales(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    q = ptq(model, calib, int8())
    names = set(activation_quantizers(q))
    assert names == {"conv1_input_quant", "conv1_output_quant", "conv2_output_quant",
                     "fc1_output_quant", "fc2_output_quant"}
    # conv2 reads conv1's output through a max-pool: same quantizer, called without observing
    assert "self.conv1_output_quant(max_pool2d, observe = False)" in q.code
    x = next(iter(calib))
    for name in ("conv1", "conv2", "fc1", "fc2"):
        wq = get_weight_quant(q.get_submodule(name))
        assert wq.spec.bits == 8 and wq.scale.shape == (q.get_submodule(name).out_features
                                                       if name.startswith("fc") else
                                                       q.get_submodule(name).out_channels,)
    assert q(x).shape == (len(x), 10)


def test_quantized_weights_are_on_the_integer_grid(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    q = ptq(model, calib, int8())
    conv = q.get_submodule("conv2")
    wq = get_weight_quant(conv)
    ints = conv.weight / wq.scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ints, ints.round(), atol=1e-3, rtol=0)
    assert float(ints.detach().abs().max()) <= 128
    assert sqnr(conv.parametrizations.weight.original, conv.weight) > 35


def test_activations_are_uint8_after_relu(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    q = ptq(model, calib, int8())
    fc1 = q.get_submodule("fc1_output_quant")  # placed after the ReLU: range starts at 0
    assert int(fc1.zero_point) == 0 and fc1.spec.qmin == 0 and fc1.spec.qmax == 255


@pytest.mark.parametrize("group", [32, 64])
def test_int4_weight_only_groups(lenet5_trained, group):
    model, _, test, _, fp32 = lenet5_trained
    q = ptq(model, None, weight_only(bits=4, group_size=group))
    assert not activation_quantizers(q)
    wq = get_weight_quant(q.fc1)
    assert wq.spec.granularity == PerGroup(group)
    assert wq.scale.shape == (500, -(-800 // group))  # 800 = 12·64 + 32: a short last group
    assert sqnr(q.fc1.parametrizations.weight.original, q.fc1.weight) > 15
    assert pj.train.evaluate(q, test) >= fp32 - 0.05


def test_weight_only_stacks_after_a_pruning_mask_and_finalizes():
    model = pj.models.create("lenet300")
    pj.prune.magnitude_(model, sparsity=0.8)
    zeros = model.fc1.weight == 0
    quantize_(model, weight_only(bits=4, group_size=64))
    assert torch.equal(model.fc1.weight == 0, zeros | (model.fc1.weight == 0))
    assert bool((model.fc1.weight[zeros] == 0).all())
    x = torch.randn(3, 784)
    y = model(x)
    pj.finalize_(model)
    assert not hasattr(model.fc1, "parametrizations")
    torch.testing.assert_close(model(x), y)


def test_layers_by_type_name_and_first_last(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    q = ptq(model, calib, int8(first=False, last=False))
    assert get_weight_quant(q.conv1) is None and get_weight_quant(q.fc2) is None
    assert get_weight_quant(q.conv2) is not None
    cfg = int8(layers={"fc.*": False, "conv2": QuantSpec(4)})
    q = ptq(model, calib, cfg)
    assert get_weight_quant(q.fc1) is None
    assert get_weight_quant(q.conv2).spec.bits == 4
    assert get_weight_quant(q.conv1).spec.bits == 8
    q = ptq(model, calib, int8(types=(nn.Linear,)))
    assert get_weight_quant(q.conv1) is None and get_weight_quant(q.fc1) is not None


def test_bad_input_gives_clear_errors(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    with pytest.raises(ValueError, match="at least one batch, got an empty loader"):
        ptq(model, [], int8())
    with pytest.raises(ValueError, match="needs a calib_loader"):
        ptq(model, None, int8())
    with pytest.raises(ValueError, match=re.escape("layers pattern 'fc9' matches no module")):
        ptq(model, calib, int8(layers={"fc9": False}))
    with pytest.raises(UnsupportedLayerError, match="no layer to quantize"):
        ptq(model, calib, int8(layers={".*": False}))
    with pytest.raises(TypeError, match="config must be a penjing.quant.QuantConfig"):
        ptq(model, calib, {"bits": 8})
    with pytest.raises(ValueError, match="layer 'conv1': axis 4 does not exist"):
        ptq(model, calib, QuantConfig(weight=QuantSpec(8, granularity=pj.quant.PerChannel(4))))
    with pytest.raises(ValueError, match="needs a weight spec, an activation spec"):
        QuantConfig(weight=None, activation=None)


class _Encoder(nn.Module):
    """A two-block pre-norm encoder: one block with plain attention, one with nn.MultiheadAttention."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 2 * dim)
        self.ff2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.embed(x) + self.pos
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, -1))
        n = self.norm2(h)
        h = h + self.mha(n, n, n, need_weights=False)[0]
        h = h + self.ff2(torch.nn.functional.gelu(self.ff1(self.norm3(h))))
        return self.head(h.mean(dim=1))


def test_transformer_encoder_quantizes_its_linears():
    torch.manual_seed(0)
    model = _Encoder().eval()
    calib = [torch.randn(16, 8, 16) for _ in range(4)]
    q = ptq(model, calib, int8())
    quantized = {n for n, m in q.named_modules() if get_weight_quant(m) is not None}
    assert quantized == {"embed", "qkv", "proj", "ff1", "ff2", "head"}  # MHA stays float
    assert all(isinstance(m, ActQuant) and m.frozen for m in activation_quantizers(q).values())
    x = torch.randn(32, 8, 16)
    assert sqnr(model(x), q(x)) > 25
