"""transformers' Conv1D (GPT-2's layers, weights stored (in, out)) is a layer for what does
not care about the layout (magnitude pruning, weight sharing), and what does tells the user
it left them out."""

from __future__ import annotations

import pytest
import torch
from support_decoders import calib, logits, tiny

import penjing as pj
from penjing.errors import PenjingWarning
from penjing.hf import is_conv1d

pytest.importorskip("transformers")


def conv1ds(model) -> dict:
    return {n: m for n, m in model.named_modules() if is_conv1d(m)}


def test_magnitude_prunes_every_conv1d_of_gpt2_exactly_and_the_file_keeps_it(tmp_path):
    model = tiny("gpt2")
    assert len(conv1ds(model)) == 2 * 4
    done = pj.prune.magnitude_(model, 0.6, layers=pj.layers.types(type(model.transformer.h[0]
                                                                         .attn.c_attn)))
    assert sorted(done) == sorted(conv1ds(model))
    for name, layer in conv1ds(model).items():
        w = layer.weight
        assert int((w == 0).sum()) == round(0.6 * w.numel()), name
    pj.save(model, tmp_path / "m.safetensors")
    loaded = pj.load(tmp_path / "m.safetensors", lambda: tiny("gpt2"))
    ids = calib(1, 12, seed=4)[0]
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_kmeans_shares_the_weights_of_conv1d_layers():
    model = tiny("gpt2")
    names = sorted(conv1ds(model))
    pj.quant.quantize_(model, pj.quant.KMeansConfig(bits=3, layers=names))
    for name in names:
        assert model.get_submodule(name).weight.unique().numel() <= 8, name


def test_nm_says_it_left_gpt2s_conv1d_layers_out():
    model = tiny("gpt2")
    with pytest.warns(PenjingWarning, match="8 transformers Conv1D layers .* left out"):
        pj.prune.nm_(model, 2, 4)
    assert all(int((m.weight == 0).sum()) == 0 for m in conv1ds(model).values())
