"""Whole heads and FFN neurons of Hugging Face attention, on tiny random models built
here: a head (neuron) that adds nothing is the one removed and outputs stay the same; the
config describes the result, so save_pretrained + reload gives the same model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import penjing as pj  # noqa: E402
from penjing.core import history  # noqa: E402
from penjing.core.counting import count_macs  # noqa: E402
from penjing.errors import UnsupportedLayerError  # noqa: E402
from penjing.prune.hf_heads import attention_layers, ffn_layers  # noqa: E402


def _model(name: str):
    t = transformers
    torch.manual_seed(0)
    if name == "bert":
        return t.BertModel(t.BertConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, max_position_embeddings=64,
            num_hidden_layers=2, num_attention_heads=4)).eval()
    if name == "distilbert":
        return t.DistilBertModel(t.DistilBertConfig(
            vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
            max_position_embeddings=64)).eval()
    return t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4)).eval()


def _inputs(name: str, n: int = 3):
    if name == "vit":
        return {"pixel_values": torch.randn(n, 3, 32, 32)}
    ids = torch.randint(1, 100, (n, 11))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _silence(model, heads: dict[str, int], neurons: list[int]) -> None:
    """Zero the output columns of head `heads[layer]` in each layer and of `neurons` in
    every FFN: they add nothing to the model's output."""
    with torch.no_grad():
        for attn in attention_layers(model):
            h, size = heads[attn.name], attn.head_size
            model.get_submodule(attn.out).weight[:, h * size:(h + 1) * size] = 0
        for block in ffn_layers(model):
            model.get_submodule(block.outer).weight[:, neurons] = 0


@pytest.mark.parametrize("name", ["bert", "distilbert", "vit"])
def test_removing_silent_heads_and_neurons_keeps_outputs(name, tmp_path):
    model = _model(name)
    layers = attention_layers(model)
    assert len(layers) == 2 and all(a.heads == 4 for a in layers)
    silent = {a.name: i + 1 for i, a in enumerate(layers)}
    _silence(model, silent, list(range(0, 64, 2)))
    x = _inputs(name)
    want = model(**x).last_hidden_state
    batches = [_inputs(name, 2) for _ in range(2)]
    kept = pj.prune.hf_heads_(model, 0.25, criterion="activation", loader=batches)
    assert all(silent[n] not in k and len(k) == 3 for n, k in kept.items())
    pj.prune.hf_ffn_(model, 0.5, criterion="activation", loader=batches)
    assert all(model.get_submodule(b.inner).out_features == 32 for b in ffn_layers(model))
    torch.testing.assert_close(model(**x).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    again = pj.prune.load_pretrained(type(model), tmp_path)
    torch.testing.assert_close(again(**x).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_ffn_only_pruning_reloads_with_plain_from_pretrained(tmp_path):
    model = _model("bert")
    pj.prune.hf_ffn_(model, 0.25)
    assert model.config.intermediate_size == 48
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    x = _inputs("bert")
    torch.testing.assert_close(again(**x).last_hidden_state, model(**x).last_hidden_state)


def test_pruned_bert_still_quantizes_and_exports(tmp_path):
    model = _model("bert")
    pj.prune.hf_heads_(model, 0.5)
    x = _inputs("bert")
    q = pj.quant.dynamic(model)
    path = pj.export.onnx(q, tmp_path / "p.onnx", x)
    assert pj.export.compare_with_ort(q, path, _inputs("bert", 5)).max_abs < 0.05


def test_bad_requests_are_clear_errors():
    model = _model("bert")
    with pytest.raises(ValueError, match="needs a loader"):
        pj.prune.hf_heads_(model, 0.5, criterion="activation")
    with pytest.raises(ValueError, match=r"ratio must be a fraction to remove in \[0, 1\)"):
        pj.prune.hf_heads_(model, 1.0)
    t = transformers
    gpt2 = t.GPT2Model(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedLayerError, match="c_attn"):
        pj.prune.hf_heads_(gpt2, 0.5)


def test_mac_count_matches_a_hand_count():
    model = _model("bert")  # 2 layers, hidden 32, 4 heads of 8, FFN 64
    tokens = 10
    # per layer and token: Q, K, V, output 4·32·32 + FFN 2·32·64 + QKᵀ, AV 2·10·(4·8)
    assert pj.prune.count_hf_macs(model, tokens) == 2 * (4096 + 4096 + 640) == 17664
    # the Linear part agrees with penjing.analysis on one sequence (+ the pooler, one token)
    ids = torch.randint(1, 100, (1, tokens))
    linear = count_macs(model, ids)
    assert linear == tokens * (17664 - 2 * 640) + 32 * 32
    pj.prune.hf_heads_(model, 0.5)
    pj.prune.hf_ffn_(model, 0.5)
    # 2 heads of 8: 4·32·16 + 2·32·32 + 2·10·16 per layer
    assert pj.prune.count_hf_macs(model, tokens) == 2 * (2048 + 2048 + 320) == 8832
    with pytest.raises(ValueError, match="tokens must be a sequence length, an int >= 1, got 0"):
        pj.prune.count_hf_macs(model, 0)


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_model_file_rebuilds_heads_and_ffn_pruned_from_the_unpruned_config(name, tmp_path):
    model = _model(name)
    config = model.config.to_dict()
    batches = [_inputs(name, 2)]
    pj.prune.hf_heads_(model, 0.25, criterion="activation", loader=batches)
    pj.prune.hf_ffn_(model, 0.25)
    pj.prune.hf_heads_(model, 0.5)  # a second cut: indices into the 3 heads left
    assert [s["op"] for s in history.steps(model)] == ["hf_heads", "hf_ffn", "hf_heads"]
    pj.save(model, tmp_path / "m.safetensors")
    fresh = type(model)(type(model.config).from_dict(config))
    loaded = pj.load(tmp_path / "m.safetensors", lambda: fresh)
    x = _inputs(name)
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, model(**x).last_hidden_state)
    assert [a.heads for a in attention_layers(loaded)] == [2, 2]
    kept = pj.prune.hf_heads.KEPT_HEADS
    assert getattr(loaded.config, kept) == getattr(model.config, kept)
    width = "intermediate_size" if name == "bert" else "hidden_dim"
    assert getattr(loaded.config, width) == getattr(model.config, width) == 48
    # the loaded model saves and loads again, history and all
    pj.save(loaded, tmp_path / "again.safetensors")
    again = pj.load(tmp_path / "again.safetensors",
                    lambda: type(model)(type(model.config).from_dict(config)))
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, model(**x).last_hidden_state)


def test_replaying_a_step_of_another_model_is_a_clear_error(tmp_path):
    from penjing.errors import FormatError
    from penjing.prune.hf_heads import replay_hf_

    model = _model("bert")
    name = attention_layers(model)[0].name
    with pytest.raises(ValueError, match=r"has 4 heads; cannot keep \[1, 7\]"):
        replay_hf_(model, {"op": "hf_heads", "layers": {name: [1, 7]}})
    with pytest.raises(ValueError, match="not the first Linear of an FFN block"):
        replay_hf_(model, {"op": "hf_ffn", "layers": {"pooler.dense": [0, 1]}})
    pj.prune.hf_ffn_(model, 0.5)
    pj.save(model, tmp_path / "m.safetensors")
    small = _model("distilbert")
    with pytest.raises(FormatError, match="does not fit this DistilBertModel"):
        pj.load(tmp_path / "m.safetensors", small)


def test_heads_that_do_not_divide_and_ratios_out_of_range_are_clear_errors():
    model = _model("bert")
    model.get_submodule(attention_layers(model)[0].name).num_attention_heads = 3
    with pytest.raises(UnsupportedLayerError, match=r"32 outputs, not 3 heads × 8; the head "
                                                    "count does not divide it"):
        pj.prune.hf_heads_(model, 0.5)
    model = _model("bert")
    for ratio in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"ratio must be a fraction to remove in \[0, 1\), "
                                             f"got {ratio!r}"):
            pj.prune.hf_ffn_(model, ratio)
    with pytest.raises(ValueError, match="unknown criterion 'taylor'"):
        pj.prune.hf_ffn_(model, 0.5, criterion="taylor")
    assert history.steps(model) == []  # nothing was cut on the way to an error


def test_pjz_of_a_head_and_ffn_pruned_model_rebuilds_it(tmp_path):
    model = _model("bert")
    config = model.config.to_dict()
    pj.prune.hf_heads_(model, 0.5)
    pj.prune.hf_ffn_(model, 0.25)
    pj.codec.save(model, tmp_path / "m.pjz")
    loaded = pj.load(tmp_path / "m.pjz",
                     lambda: type(model)(type(model.config).from_dict(config)))
    assert [a.heads for a in attention_layers(loaded)] == [2, 2]
    assert loaded.config.intermediate_size == 48
    x = _inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).last_hidden_state,
                                   model(**x).last_hidden_state)
