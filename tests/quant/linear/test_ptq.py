from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.models.encoder import TinyEncoder
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


def test_transformer_encoder_quantizes_its_linears():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    calib = [torch.randn(16, 1, 28, 28) for _ in range(4)]
    q = ptq(model, calib, int8())
    quantized = {n for n, m in q.named_modules() if get_weight_quant(m) is not None}
    assert quantized == {"embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.fc1",
                         "blocks.0.fc2", "blocks.1.attn.out_proj", "blocks.1.fc1",
                         "blocks.1.fc2", "head"}
    # nn.MultiheadAttention: int8 projection weights, float activations inside it
    mha = q.get_submodule("blocks.1.attn")
    wq = get_weight_quant(mha, "in_proj_weight")
    assert wq.scale.shape == (3 * 32,) and sqnr(wq(mha.in_proj_weight), mha.in_proj_weight) == \
        float("inf")  # already on the grid: quantizing again changes nothing
    assert not any(n.startswith("blocks_1_attn") for n in activation_quantizers(q))
    assert all(isinstance(m, ActQuant) and m.frozen for m in activation_quantizers(q).values())
    x = torch.randn(32, 1, 28, 28)
    assert sqnr(model(x), q(x)) > 25


def test_a_layer_called_twice_gets_a_quantizer_per_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    q = ptq(Twice(), [torch.randn(4, 8)], int8())
    # the second call reads tanh's output, which has its own quantizer (named for the first)
    assert set(activation_quantizers(q)) == {"fc_input_quant", "fc_output_quant",
                                             "fc_tanh_quant", "fc_output_quant_1"}


def test_activation_axis_that_does_not_exist_names_the_quantizer(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    cfg = QuantConfig(activation=QuantSpec(8, False, False, pj.quant.PerChannel(5)))
    with pytest.raises(ValueError, match="'conv1_input_quant': axis 5 does not exist"):
        ptq(model, calib, cfg)
    with pytest.raises(ValueError, match="'conv1_input_quant': activation observers work per"):
        ptq(model, calib, QuantConfig(activation=QuantSpec(8, granularity=PerGroup(8))))


def test_nan_weight_names_its_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '2': values to quantize must be finite"):
        ptq(model, None, weight_only())


def test_bad_config_values_are_clear_errors(lenet5_trained):
    model, _, _, calib, _ = lenet5_trained
    with pytest.raises(ValueError, match=r"layers pattern 'conv\[' is not a regular expression"):
        int8(layers={"conv[": False})
    with pytest.raises(TypeError, match=r"layers\['fc1'\] must be True, False or a QuantSpec"):
        int8(layers={"fc1": 8})
    with pytest.raises(ValueError, match="group size must be a positive int, got 0"):
        weight_only(group_size=0)  # once quietly per channel
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2))
    with pytest.raises(UnsupportedLayerError, match="layer '1' is a MaxPool2d"):
        ptq(pooled, calib, int8(layers={"1": True}))
    with pytest.raises(ValueError, match="unknown weight range 'l2'"):
        ptq(model, None, weight_only(weight_range="l2"))


def test_quantizing_twice_and_bad_calibration_batches_are_errors(lenet5_trained):
    model = pj.models.create("lenet300")
    quantize_(model, weight_only())
    with pytest.raises(ValueError, match="layer 'fc1' already has quantized or shared weights"):
        quantize_(model, weight_only())
    q = pj.quant.prepare(lenet5_trained[0], int8())
    with pytest.raises(ValueError, match="batches must be >= 1 or None, got 0"):
        pj.quant.calibrate_(q, lenet5_trained[3], batches=0)
    with pytest.raises(TypeError, match="a batch must be a tensor, a dict"):
        pj.quant.calibrate_(q, [3])
    with pytest.raises(TypeError, match=r"got keyword input\(s\) \[.images.\]"):
        pj.quant.calibrate_(q, [{"images": torch.randn(1, 1, 28, 28)}])


class _Branchy(torch.nn.Module):
    """A layer whose forward branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_model_names_the_module_and_suggests_weights_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _Branchy())
    with pytest.raises(UnsupportedLayerError, match=r"cannot trace module '1' \(_Branchy\)"
                       r".*quantize weights only \(activation=None\)"):
        pj.quant.ptq(model, [torch.randn(2, 4)])
    q = pj.quant.ptq(model, None, pj.quant.weight_only(bits=8))  # weights only needs no trace
    assert q(torch.ones(2, 4)).shape == (2, 4)


def test_ptq_gives_back_a_graph_module_or_the_users_class_and_leaves_the_model():
    """The documented contract: traced with activation quantizers, else the user's class."""
    model = pj.models.create("lenet5").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(4, 1, 28, 28)]
    static = ptq(model, calib, int8())
    assert isinstance(static, torch.fx.GraphModule)
    weights = ptq(model, None, weight_only(4, 16))
    assert type(weights) is type(model) and weights is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
