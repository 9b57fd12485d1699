"""Decoders quantized by GPTQ / AWQ export to ONNX with their weights as 4-bit integers
(MatMulNBits in ONNX Runtime), and ONNX Runtime gives PyTorch's logits at any length."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from support_decoders import calib, tiny

import penjing as pj
from penjing.errors import UnsupportedLayerError
from penjing.export.ort import optimized_ops, ort_run

pytest.importorskip("transformers")


def feed(length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = calib(1, length, seed=seed)[0]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize(("kind", "config"), [
    ("llama", pj.quant.GPTQConfig(4, 16)),
    ("qwen2", pj.quant.AWQConfig(4, 16, grid=5)),
    ("opt", pj.quant.GPTQConfig(3, 16)),
])
def test_a_quantized_decoder_runs_in_onnx_runtime_on_4_bit_kernels(kind, config, tmp_path):
    model = tiny(kind)
    done = pj.quant.quantize_(model, config, calib=calib(4))
    path = tmp_path / "m.onnx"
    axes = {"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}}
    pj.export.onnx(model, path, feed(20, 3), dynamic_axes=axes)
    linears = {"llama": 7, "qwen2": 7, "opt": 6}[kind] * 2  # every block Linear, 2 blocks
    stored = [t for t in onnx.load(path).graph.initializer
              if t.name.endswith(("_int4", "_int4_t"))
              and t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]
    assert len(stored) == len(done) == linears  # every quantized weight stored as int4
    # OPT's fc1 runs on 2-D tokens and feeds a ReLU: ORT fuses its MatMul, bias and ReLU
    # into one FusedGemm before it would fuse the dequantization, so 2 of its 12 run there
    kernels = linears - (2 if kind == "opt" else 0)
    assert optimized_ops(path).get("MatMulNBits") == kernels
    for length, seed in ((20, 3), (37, 4)):  # another length than the traced one
        inputs = feed(length, seed)
        with torch.no_grad():
            want = model(**inputs).logits.numpy()
        got = ort_run(path, inputs)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_a_decoder_without_its_attention_mask_is_told_to_give_it(tmp_path):
    model = tiny("llama")
    with pytest.raises(UnsupportedLayerError, match="give the attention mask too"):
        pj.export.onnx(model, tmp_path / "m.onnx", {"input_ids": calib(1, 8)[0]})
