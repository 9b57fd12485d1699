"""Hugging Face transformers through PTQ and dynamic INT8, on tiny random models built
here (2 layers, width 32, no download): every Linear on an integer kernel in ONNX Runtime,
softmax / LayerNorm / GELU in float, and a sequence longer than the export example."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import penjing as pj  # noqa: E402
from penjing.errors import PenjingWarning  # noqa: E402
from penjing.export import compare_with_ort, cpu_saturates_int8, optimized_ops  # noqa: E402

INTEGER = ("QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
           "DynamicQuantizeMatMul")
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4}


def _text_model(name: str):
    t = transformers
    configs = {
        "bert": lambda: t.BertModel(t.BertConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, max_position_embeddings=64,
            **SMALL)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(
            vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
            max_position_embeddings=64)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, max_position_embeddings=66,
            pad_token_id=1, **SMALL)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    }
    torch.manual_seed(0)
    return configs[name]().eval()


def _tokens(n: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 100, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _linears(model) -> int:
    from penjing.quant.linear.eager import is_conv1d

    return sum(isinstance(m, torch.nn.Linear) or is_conv1d(m) for m in model.modules())


def _integer_kernels(path) -> tuple[int, dict[str, int]]:
    ops = optimized_ops(path)
    return sum(ops.get(op, 0) for op in INTEGER), ops


@pytest.mark.parametrize("name", ["bert", "distilbert", "roberta", "gpt2"])
def test_static_int8_puts_every_linear_on_integer_kernels(name, tmp_path):
    model = _text_model(name)
    calib = [_tokens(4, 12) for _ in range(3)]
    q = pj.quant.ptq(model, calib, pj.quant.int8(reduce_range=cpu_saturates_int8()))
    assert type(q) is type(model) and q is not model  # ptq's contract: the user's class
    with warnings.catch_warnings():
        warnings.simplefilter("error", PenjingWarning)  # every quantized Linear fused
        path = pj.export.onnx(q, tmp_path / "q.onnx", _tokens(2, 8))
    kernels, ops = _integer_kernels(path)
    assert kernels == _linears(model)
    assert ops.get("Softmax", 0) >= 2  # attention probabilities stay float
    longer = _tokens(3, 21)
    agreement = compare_with_ort(q, path, longer)
    assert agreement.max_abs < 1e-3
    ref = model(**longer).last_hidden_state
    got = q(**longer).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1))
    assert cos.min() > 0.99


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_dynamic_int8_runs_ort_integer_matmuls_and_matches_pytorch(name, tmp_path):
    model = _text_model(name)
    q = pj.quant.dynamic(model, reduce_range=cpu_saturates_int8())
    assert _linears(q) == 0 and len(
        [m for m in q.modules() if isinstance(m, pj.quant.DynamicLinear)]) == _linears(model)
    path = pj.export.onnx(q, tmp_path / "d.onnx", _tokens(2, 8))
    kernels, ops = _integer_kernels(path)
    assert kernels == _linears(model)
    longer = _tokens(3, 21)
    agreement = compare_with_ort(q, path, longer)
    assert agreement.max_abs < 1e-4
    ref = model(**longer).last_hidden_state
    got = q(**longer).last_hidden_state
    assert torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1)).min() > 0.99


def test_vit_static_int8_linears_on_integer_kernels(tmp_path):
    t = transformers
    torch.manual_seed(0)
    model = t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                   intermediate_size=64, **SMALL)).eval()
    images = [{"pixel_values": torch.randn(2, 3, 32, 32)} for _ in range(3)]
    q = pj.quant.ptq(model, images, pj.quant.int8(reduce_range=cpu_saturates_int8()))
    path = pj.export.onnx(q, tmp_path / "v.onnx", images[0])
    kernels, _ = _integer_kernels(path)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert kernels == linears
    assert compare_with_ort(q, path, {"pixel_values": torch.randn(5, 3, 32, 32)}).max_abs < 1e-3


def test_dynamic_without_linear_is_an_error():
    with pytest.raises(ValueError, match="has no nn.Linear layer"):
        pj.quant.dynamic(torch.nn.Sequential(torch.nn.ReLU()))


def test_a_sequence_longer_than_the_position_table_is_a_clear_error():
    model = _text_model("bert")
    with pytest.raises(ValueError, match="70 tokens, more than the 64 positions BertModel"):
        pj.quant.ptq(model, [_tokens(2, 70)], pj.quant.int8())
