from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.export import compare_with_ort, ort_accuracy, ort_latency, ort_run
from penjing.export import onnx as export_onnx


@pytest.mark.parametrize("name", ["lenet5", "vgg"])
def test_fp32_export_matches_torch_at_any_batch(tmp_path, name):
    kwargs = {"width": 0.25} if name == "vgg" else {}
    model = pj.models.create(name, **kwargs).eval()
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28))
    onnx.checker.check_model(onnx.load(path))
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        (got,) = ort_run(path, x)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_export_keeps_training_mode_and_masks(tmp_path):
    model = pj.models.create("lenet300")
    pj.prune.magnitude_(model, sparsity=0.5)
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    model.train()
    x = torch.randn(3, 1, 28, 28)
    path = export_onnx(model, tmp_path / "m.onnx", x)
    assert model.training
    model.eval()
    np.testing.assert_allclose(ort_run(path, x)[0], model(x).detach().numpy(), atol=1e-4)


def test_latency_is_a_positive_median(tmp_path):
    model = pj.models.create("lenet5")
    x = torch.randn(2, 1, 28, 28)
    path = export_onnx(model, tmp_path / "m.onnx", x)
    seconds = ort_latency(path, x, threads=2, repeats=5, warmup=1)
    assert 0 < seconds < 1.0
    assert ort_latency(path, {"input": x.numpy()}, repeats=3) > 0


def test_latency_rejects_bad_arguments(tmp_path):
    path = export_onnx(pj.models.create("lenet300"), tmp_path / "m.onnx", torch.randn(1, 784))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        ort_latency(path, torch.randn(1, 784), repeats=0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ort_latency(path, torch.randn(1, 784), threads=0)
    with pytest.raises(ValueError, match="takes 1 input"):
        ort_run(path, [torch.randn(1, 784), torch.randn(1, 784)])
    with pytest.raises(FileNotFoundError):
        ort_latency(tmp_path / "missing.onnx", torch.randn(1, 784))


class _Bessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(self.proj(x))


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = _Bessel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_unsupported_op_names_op_and_module(tmp_path, capfd):
    with pytest.raises(UnsupportedLayerError, match=r"aten::i0 used in module 'head'"):
        export_onnx(_Wrapper(), tmp_path / "bad.onnx", torch.randn(2, 3))
    assert not (tmp_path / "bad.onnx").exists()


def test_bad_example_inputs_is_type_error(tmp_path):
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        export_onnx(pj.models.create("lenet300"), tmp_path / "m.onnx", "x")


def test_ort_accuracy_is_the_accuracy_of_the_exported_model(tmp_path):
    torch.manual_seed(0)
    model = pj.models.create("lenet5").eval()
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    loader = list(zip(x.split(16), y.split(16), strict=True))
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    assert ort_accuracy(path, loader) == pj.train.evaluate(model, loader)
    with pytest.raises(ValueError, match="cannot evaluate on an empty loader"):
        ort_accuracy(path, [])


def test_bad_export_and_run_arguments_are_clear_errors(tmp_path):
    model, x = pj.models.create("lenet300").eval(), torch.randn(2, 784)
    with pytest.raises(ValueError, match="opset must be >= 13"):
        export_onnx(model, tmp_path / "m.onnx", x, opset=11)
    with pytest.raises(ValueError, match="got 2 name\\(s\\) for 1 input\\(s\\)"):
        export_onnx(model, tmp_path / "m.onnx", x, input_names=["a", "b"])
    path = export_onnx(model, tmp_path / "m.onnx", x)
    with pytest.raises(ValueError, match=r"unknown input name\(s\) \['image'\]"):
        ort_run(path, {"image": x})
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 3)).eval()
    with pytest.raises(ValueError, match="was not exported from this model"):
        compare_with_ort(other, path, x)
