"""Weight-only INT4 in groups on a (tiny, random) BERT, embeddings included: ONNX export
that ONNX Runtime runs as MatMulNBits and GatherBlockQuantized, the model file, the .pjz."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import penjing as pj
from penjing.export import onnx as export_onnx
from penjing.export import optimized_ops, ort_run, session
from penjing.quant import QuantConfig, weight_only

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, FFN = 200, 64, 2, 128


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, intermediate_size=FFN,
                                     vocab_size=VOCAB)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def feed() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def int4(bert) -> nn.Module:
    return pj.quant.ptq(bert, None, weight_only(4, 32, embeddings=True))


@pytest.fixture(scope="module")
def int4_file(int4, feed, tmp_path_factory) -> str:
    return export_onnx(int4, tmp_path_factory.mktemp("onnx") / "int4.onnx", feed)


def _hidden(model: nn.Module, feed: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**feed).last_hidden_state.numpy()


def _weights(model: nn.Module, types: tuple) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, types))


def test_int4_groups_run_as_matmulnbits_with_quantized_embeddings(bert, int4, int4_file,
                                                                  feed):
    import onnx

    q, path = int4, int4_file
    ops = optimized_ops(path)
    linears = sum(isinstance(m, nn.Linear) for m in bert.modules())
    tables = sum(isinstance(m, nn.Embedding) for m in bert.modules())
    assert ops.get("MatMulNBits") == linears == 6 * LAYERS
    assert ops.get("GatherBlockQuantized") == tables == 3
    assert "DequantizeLinear" not in ops
    # stored: int4 (half a byte) plus one float32 scale per 32 values, the rest float32
    quantized = _weights(bert, (nn.Linear, nn.Embedding))
    params = sum(p.numel() for p in bert.parameters())
    stored = sum(len(t.raw_data) or t.ByteSize() for t in onnx.load(path).graph.initializer)
    assert stored <= quantized * (0.5 + 4 / 32) + 4 * (params - quantized) + 2_000
    assert os.path.getsize(path) < 0.35 * 4 * params  # a tiny model's graph included
    # accuracy level 1 (the default) computes in float: the fake-quantized model's numbers
    got = ort_run(path, feed)[0]
    want = _hidden(q, feed)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.abs(want - _hidden(bert, feed)).max() > 1e-3  # the weights did change


def test_accuracy_level_4_quantizes_activations_on_the_fly(int4, int4_file, feed):
    q, path = int4, int4_file
    sess = session(path, accuracy_level=4)
    got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    want = _hidden(q, feed)
    diff = np.abs(got - want).max()
    assert 1e-6 < diff < 0.05 * np.abs(want).max()
    with pytest.raises(ValueError, match=r"accuracy_level must be one of \(0, 1, 2, 3, 4\)"):
        session(path, accuracy_level=5)


def test_int8_groups_run_as_8_bit_kernels(bert, feed, tmp_path):
    q = pj.quant.ptq(bert, None, weight_only(8, 16, embeddings=True))
    path = export_onnx(q, tmp_path / "int8.onnx", feed)
    ops = optimized_ops(path)
    assert ops.get("MatMulNBits") == 6 * LAYERS and ops.get("GatherBlockQuantized") == 3
    np.testing.assert_allclose(ort_run(path, feed)[0], _hidden(q, feed), atol=2e-5, rtol=1e-5)


def test_group_not_a_power_of_two_nor_dividing_rows_runs_as_standard_onnx(bert, feed,
                                                                          tmp_path):
    # rows of 64 and 128 split into groups of 48 end in a shorter group; ORT's 4-bit
    # kernels need a power of two >= 16, so DequantizeLinear -> MatMul / Gather stays
    q = pj.quant.ptq(bert, None, weight_only(4, 48, embeddings=True))
    path = export_onnx(q, tmp_path / "g48.onnx", feed)
    ops = optimized_ops(path)
    assert "MatMulNBits" not in ops and "GatherBlockQuantized" not in ops
    assert ops.get("DequantizeLinear", 0) >= 6 * LAYERS + 3
    np.testing.assert_allclose(ort_run(path, feed)[0], _hidden(q, feed), atol=2e-5, rtol=1e-5)


def test_contrib_ops_off_keeps_the_file_standard_onnx(int4, feed, tmp_path):
    import onnx

    q = int4
    path = export_onnx(q, tmp_path / "std.onnx", feed, contrib_ops=False)
    proto = onnx.load(path)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in proto.opset_import) == 21
    np.testing.assert_allclose(ort_run(path, feed)[0], _hidden(q, feed), atol=2e-5, rtol=1e-5)


def test_model_file_round_trip_keeps_int4_embeddings(bert, int4, feed, tmp_path):
    q = int4
    path = tmp_path / "int4.safetensors"
    size = pj.save(q, path)
    quantized = _weights(bert, (nn.Linear, nn.Embedding))
    rest = sum(p.numel() for p in bert.parameters()) - quantized
    assert size < quantized * (0.5 + 4 / 32) + 4 * rest + 32_000  # int4, two to a byte
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, intermediate_size=FFN,
                                     vocab_size=VOCAB)
    loaded = pj.load(path, transformers.BertModel(config, add_pooling_layer=False)).eval()
    table = loaded.embeddings.word_embeddings
    assert pj.quant.get_weight_quant(table) is not None
    np.testing.assert_array_equal(_hidden(loaded, feed), _hidden(q, feed))


def test_pjz_round_trip_compresses_the_embeddings(bert, feed, tmp_path):
    import copy

    model = copy.deepcopy(bert)
    tables = ["embeddings.word_embeddings", "embeddings.position_embeddings"]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    pj.prune.magnitude_(model, dict.fromkeys(tables + linears, 0.5))
    pj.quant.kmeans_(model, bits={**dict.fromkeys(tables, 4), **dict.fromkeys(linears, 5)})
    pj.prune.finalize_(model)
    path = tmp_path / "bert.pjz"
    pj.codec.save(model, path)
    # the tables and Linears: half zeros, the rest at most 4 / 5 bits, each bound by the
    # raw codes (entropy coding only saves); everything else float32
    shared = _weights(model, (nn.Linear, nn.Embedding))
    rest = sum(p.numel() for p in model.parameters()) - shared
    bound = shared * 5 / 8 + 4 * rest + 16_000
    assert os.path.getsize(path) < bound < 0.3 * 4 * (shared + rest)
    state = pj.codec.load(path)
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name  # the shared values, exactly
    word = state["embeddings.word_embeddings.weight"]
    assert (word == 0).float().mean() == pytest.approx(0.5, abs=1e-3)
    assert word.unique().numel() <= 2**4
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, intermediate_size=FFN,
                                     vocab_size=VOCAB)
    fresh = transformers.BertModel(config, add_pooling_layer=False).eval()
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(_hidden(fresh, feed), _hidden(model, feed))


def test_bad_input_is_refused_with_the_rule(bert, int4, feed, tmp_path):
    with pytest.raises(ValueError, match="bits must be one of .* got 9"):
        weight_only(9, 32, embeddings=True)
    with pytest.raises(ValueError, match="group size must be a positive int, got 0"):
        weight_only(4, 0, embeddings=True)
    with pytest.raises(ValueError, match="integer ids, not an activation"):
        QuantConfig(types=(nn.Linear, nn.Embedding))
    with pytest.raises(ValueError, match="needs opset >= 21, got opset=17"):
        export_onnx(int4, tmp_path / "old.onnx", feed, opset=17)
    with pytest.raises(ValueError, match="opset must be >= 13 .* and <= 21"):
        export_onnx(bert, tmp_path / "new.onnx", feed, opset=22)
    with pytest.raises(pj.errors.UnsupportedLayerError, match="LayerNorm"):
        pj.prune.magnitude_(bert, {"embeddings.LayerNorm": 0.5})
