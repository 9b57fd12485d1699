"""FP16 / BF16 casting: weights and activations in the half type, error measured, FP16
ONNX export that ONNX Runtime runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.quant.cast import cast, cast_report


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


@pytest.mark.parametrize(("dtype", "torch_dtype", "floor"), [
    ("fp16", torch.float16, 50.0), ("bf16", torch.bfloat16, 35.0)])
def test_cast_computes_in_the_half_type_and_reports_its_error(dtype, torch_dtype, floor):
    model = _model().eval()
    x = torch.randn(8, 1, 28, 28)
    half = cast(model, dtype)
    assert all(p.dtype == torch_dtype for p in half.parameters())
    seen = []
    half.model[1].register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    out = half(x)
    assert seen == [torch_dtype] and out.dtype == torch.float32  # activations half, logits float
    report = cast_report(model, x, dtype)
    assert floor < report.output_sqnr < 120
    assert report.agreement is not None and report.max_abs_error > 0
    expected = pj.quant.sqnr(model[0].weight, model[0].weight.to(torch_dtype).float())
    assert report.weight_sqnr["0.weight"] == pytest.approx(expected)
    assert next(p for p in model.parameters()).dtype == torch.float32  # original untouched


def test_fp16_overflow_is_counted():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1e6, 1.0], [1e-9, 2.0]]))
    report = cast_report(model, torch.randn(3, 2), "fp16")
    assert report.overflow["weight"] == 1 and report.underflow["weight"] == 1


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="fp16"):
        cast(_model(), "fp8")


def test_fp16_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = _model().eval()
    x = torch.randn(4, 1, 28, 28)
    path = pj.export.onnx(cast(model, "fp16"), tmp_path / "half.onnx", x[:1])
    proto = onnx.load(str(path))
    kinds = {init.data_type for init in proto.graph.initializer if len(init.dims) > 1}
    assert kinds == {onnx.TensorProto.FLOAT16}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert pj.quant.sqnr(model(x), out) > 50
