"""INT8 QDQ export: ONNX Runtime runs it on integer kernels and follows penjing's simulation.

The bound we reach and hold here: every output of ONNX Runtime's integer model is within
two steps of the output quantizer of penjing's fake-quant model, at least 75 % of outputs
are the very same integer, and the predicted class agrees on at least 99 % of images.
(ORT rounds each layer's int32 accumulator, bias rounded to the s_x·s_w grid, once;
PyTorch sums the same products and the float bias in float, so a value sitting on a
rounding boundary can land one step away, and such a step can grow by one more through
the next layer. The trained models of bench/quantization.py stay within one step.)
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.export import compare_with_ort, cpu_saturates_int8, optimized_ops, ort_run
from penjing.export import onnx as export_onnx
from penjing.models.encoder import TinyEncoder
from penjing.quant import QuantConfig, QuantSpec, int8, ptq, qat, weight_only
from penjing.quant.linear.graph import quantized_joins

# x86 CPUs without VNNI saturate u8×s8 pair sums in int16: 7-bit weights keep them exact
INT8 = {"reduce_range": cpu_saturates_int8()}

# the torchvision-like architectures the pruning tests use
_spec = importlib.util.spec_from_file_location(
    "prune_zoo", Path(__file__).parents[1] / "prune" / "zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


@pytest.fixture(scope="module")
def images(mnist) -> torch.Tensor:
    return mnist.train.tensors[0][:320]


def _bn_vgg() -> nn.Module:
    torch.manual_seed(0)
    model = pj.models.create("vgg", width=0.5)
    for m in model.modules():  # statistics that make folding change the weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "vgg":
        return _bn_vgg()
    if name == "encoder":
        return TinyEncoder().eval()
    return pj.models.create(name).eval()


@pytest.mark.parametrize("name", ["lenet5", "vgg"])
def test_int8_export_runs_on_integer_kernels_only(tmp_path, images, name):
    model = _model(name)
    q = ptq(model, images[:256].split(64), int8(**INT8))
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    ops = optimized_ops(path)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert ops.get("QLinearConv") == convs and ops.get("QGemm") == linears
    assert not {"Conv", "Gemm", "MatMul", "BatchNormalization"} & set(ops)
    # one QuantizeLinear at the input, one DequantizeLinear at the output: all else integer
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    inits = {t.name: t for t in onnx.load(path).graph.initializer}
    dtypes = {t.data_type for t in inits.values()}
    assert TensorProto.INT8 in dtypes and TensorProto.INT32 in dtypes  # weights, biases
    assert TensorProto.FLOAT not in {
        t.data_type for t in inits.values() if len(t.dims) >= 2
    }  # no float weight matrix is left in the file


@pytest.mark.parametrize(
    ("name", "observer"),
    [("lenet5", "minmax"), ("lenet5", "entropy"), ("vgg", "percentile"), ("vgg", "mse"),
     ("encoder", "minmax")],
)
def test_ort_int8_agrees_with_fake_quant_within_two_output_steps(
    tmp_path, images, name, observer
):
    model = _model(name)
    q = ptq(model, images[:256].split(64), int8(observer=observer, **INT8))
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    agreement = compare_with_ort(q, path, images)
    assert agreement.step is not None and agreement.step > 0
    assert agreement.max_steps <= 2
    assert agreement.max_abs <= 2 * agreement.step * (1 + 1e-3)
    assert agreement.exact >= 0.75
    assert agreement.top1 >= 0.99
    # and the simulation really is quantized: far from the float model at 1 step
    assert pj.quant.sqnr(model(images), q(images)) < 60


def test_encoder_linears_run_as_integer_matmuls(tmp_path, images):
    model = _model("encoder")
    q = ptq(model, images[:128].split(64), int8(**INT8))
    ops = optimized_ops(export_onnx(q, tmp_path / "q.onnx", images[:1]))
    integer = sum(ops.get(k, 0) for k in ("MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
                                           "MatMulInteger", "DynamicQuantizeMatMul"))
    linears = sum(pj.quant.get_weight_quant(m) is not None for m in q.modules())
    assert linears == 9  # 8 Linear layers and the out_proj of nn.MultiheadAttention
    assert integer >= 8  # every Linear with quantized inputs, plus q·kᵀ, on integers
    assert ops.get("MatMulNBits", 0) >= 1  # attention's int8 input projection, weight-only


def test_batch_axis_is_dynamic_and_batch_one_agrees(tmp_path, images):
    q = ptq(_model("lenet5"), images[:128].split(64), int8(**INT8))
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    for batch in (1, 7, 64):
        (got,) = ort_run(path, images[:batch])
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, q(images[:batch]).detach().numpy(),
                                   atol=2 * float(q.fc2_output_quant.scale) * 1.001)


def test_int4_weight_only_stores_the_integers_in_blocks(tmp_path, images):
    model = _model("lenet5")
    q = ptq(model, None, weight_only(bits=4, group_size=32))
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", images[:1])
    assert "QuantizeLinear" not in optimized_ops(path)
    # int4 plus a float32 scale per 32 weights (conv rows of 25 and 150 end in short groups)
    assert os.path.getsize(path) < 0.25 * os.path.getsize(fp32)
    np.testing.assert_allclose(ort_run(path, images[:16])[0], q(images[:16]).detach().numpy(),
                               atol=1e-4, rtol=1e-4)


def test_lsq_trained_scales_export_and_agree(tmp_path, images):
    model = _model("lenet5")
    labels = torch.arange(len(images)) % 10
    loader = list(zip(images.split(64), labels.split(64), strict=True))
    q = qat(model, loader, int8(learnable=True, **INT8), epochs=1, lr=1e-2, calib_batches=2,
            progress=False)
    calibrated = ptq(model, images[:128].split(64), int8())
    for name in ("conv1_output_quant", "fc2_output_quant"):  # learned, then baked in
        learned, start = q.get_submodule(name).scale, calibrated.get_submodule(name).scale
        assert not isinstance(learned, nn.Parameter) and float(learned) > 0
        assert abs(float(learned) / float(start) - 1) > 0.02
    assert float(pj.quant.get_weight_quant(q.fc1).scale.min()) > 0
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    agreement = compare_with_ort(q, path, images[:128])
    assert agreement.max_steps <= 2 and agreement.top1 >= 0.99


def test_activations_wider_than_8_bits_cannot_be_exported(tmp_path, images):
    cfg = QuantConfig(activation=QuantSpec(16, symmetric=False, signed=False))
    q = ptq(_model("lenet5"), images[:64].split(64), cfg)
    with pytest.raises(ValueError, match="'conv1_input_quant' uses 16 bits; ONNX QDQ"):
        export_onnx(q, tmp_path / "q.onnx", images[:1])
    assert not (tmp_path / "q.onnx").exists()


def test_uncalibrated_model_cannot_be_exported(tmp_path, images):
    q = pj.quant.prepare(_model("lenet5"), int8())
    with pytest.raises(ValueError, match="'conv1_input_quant' is not calibrated yet"):
        export_onnx(q, tmp_path / "q.onnx", images[:1])


class _Bessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(self.fc(x.flatten(1)))


def test_quantized_model_with_unsupported_op_names_the_op(tmp_path, images):
    q = ptq(_Bessel(), images[:64].split(64), int8())
    with pytest.raises(UnsupportedLayerError, match=r"cannot export aten::i0"):
        export_onnx(q, tmp_path / "q.onnx", images[:1])


class _HalvedConv(nn.Conv2d):
    """A Conv2d subclass whose forward scales its input first: that Mul sits between the
    input quantizer and the convolution in the exported file."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 0.5)


def test_layers_left_in_float_by_the_export_are_named_in_a_warning(tmp_path, images):
    model = nn.Sequential(_HalvedConv(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    q = ptq(model.eval(), images[:64].split(32), int8(**INT8))
    with pytest.warns(pj.errors.PenjingWarning, match=r"1 of them in float: \['/0/Conv'\] read "
                      r"a value that is not dequantized"):
        export_onnx(q, tmp_path / "q.onnx", images[:1])
    ops = optimized_ops(tmp_path / "q.onnx")
    assert ops.get("QGemm") == 1 and ops.get("QLinearConv", 0) == 0


def _ort_graph_ops(path: Path) -> Counter:
    """The op types of the graph ONNX Runtime runs for `path` with every optimization on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = os.fspath(path.with_name("optimized.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


INTEGER_JOINS = {"add": "QLinearAdd", "mul": "QLinearMul", "cat": "QLinearConcat"}


@pytest.mark.parametrize(("name", "joins", "float_ops"), [
    ("resnet18", {"add": 4}, {"Add", "Relu", "Concat", "Mul"}),
    ("resnet50", {"add": 3}, {"Add", "Relu", "Concat", "Mul"}),
    ("mobilenetv3_se", {"add": 2, "mul": 2}, {"Add"}),  # HardSwish stays float: own quantizer
    ("densenet", {"cat": 3}, {"Concat"}),
    ("squeezenet", {"cat": 3}, {"Concat", "Relu"}),
])
def test_residual_adds_gates_and_concats_run_as_integer_ops(tmp_path, name, joins, float_ops):
    torch.manual_seed(0)
    model = zoo.ZOO[name]().eval()
    x = torch.randn(160, 3, 16, 16)
    q = ptq(model, x[:128].split(32), int8(**INT8))
    assert Counter(quantized_joins(q).values()) == joins
    with warnings.catch_warnings():
        warnings.simplefilter("error", pj.errors.PenjingWarning)  # every join fused
        path = Path(export_onnx(q, tmp_path / "q.onnx", x[:1]))
    ops = _ort_graph_ops(path)
    assert {INTEGER_JOINS[k]: ops[INTEGER_JOINS[k]] for k in joins} == {
        INTEGER_JOINS[k]: n for k, n in joins.items()}
    assert not float_ops & set(ops), ops  # no float join between quantized layers
    agreement = compare_with_ort(q, path, x)
    assert agreement.exact >= 0.75 and agreement.top1 >= 0.99
    assert agreement.step is None or agreement.max_steps <= 2  # squeezenet ends in a float pool
    assert pj.quant.sqnr(model(x), q(x)) > 30


def test_efficientnet_lite_runs_on_integers_only(tmp_path):
    """A model we did not write: EfficientNet-Lite0 from the `efficientnet-lite-pytorch`
    package (the bench extra), its TF "same" padding and its nine MBConv residual adds."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    x = torch.randn(48, 3, 32, 32)
    q = ptq(model, x[:32].split(16), int8(**INT8))
    assert Counter(quantized_joins(q).values()) == {"add": 9}
    path = Path(export_onnx(q, tmp_path / "q.onnx", x[:1]))
    ops = _ort_graph_ops(path)
    assert ops["QLinearConv"] == 49 and ops["QLinearAdd"] == 9
    assert not {"Add", "Pad", "Conv", "Clip"} & set(ops)  # pads folded into the convs
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    agreement = compare_with_ort(q, path, x)
    assert agreement.max_steps <= 2 and agreement.top1 >= 0.99
