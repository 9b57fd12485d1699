"""Attention heads removed for real: same outputs as zeroing the heads' output slices."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.core.counting import count_macs, count_params
from penjing.errors import UnsupportedLayerError
from penjing.prune import HeadAttention, heads_

_spec = importlib.util.spec_from_file_location("prune_zoo", Path(__file__).with_name("zoo.py"))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_head_attention_computes_what_torch_computes(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    ours = HeadAttention.from_mha(mha).eval()
    q, k = torch.randn(3, 5, 8), torch.randn(3, 7, kdim or 8)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    masks = [{}, {"attn_mask": torch.rand(5, 7) > 0.7},
             {"key_padding_mask": torch.rand(3, 7) > 0.8},
             {"attn_mask": torch.randn(5, 7), "average_attn_weights": False}]
    for kwargs in masks:
        expected, ours_out = mha(q, k, k, **kwargs), ours(q, k, k, **kwargs)
        torch.testing.assert_close(ours_out[0], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_out[1], expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_attention_takes_unbatched_inputs_as_torch_does(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    ours = HeadAttention.from_mha(mha).eval()
    q, k = torch.randn(8, 8), torch.randn(6, 8)  # 8 tokens of width 8: a swap would not show
    for kwargs in [{}, {"key_padding_mask": torch.rand(6) > 0.7},
                   {"average_attn_weights": False}]:
        expected, ours_out = mha(q, k, k, **kwargs), ours(q, k, k, **kwargs)
        torch.testing.assert_close(ours_out[0], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_out[1], expected[1], atol=1e-5, rtol=1e-5)


def test_removing_heads_equals_zeroing_their_output_columns():
    torch.manual_seed(0)
    model = zoo.ViTMHA().eval()
    x = torch.randn(2, 3, 16, 16)
    small = copy.deepcopy(model)
    kept = heads_(small, ratio=0.5)
    assert set(kept) == {"blocks.0.attn", "blocks.1.attn"}
    reference = copy.deepcopy(model)
    for name, heads in kept.items():
        assert len(heads) == 2
        attn = small.get_submodule(name)
        assert isinstance(attn, HeadAttention) and attn.num_heads == 2
        assert attn.q_proj.weight.shape == (8, 16) and attn.out_proj.weight.shape == (16, 8)
        out_proj = reference.get_submodule(name).out_proj
        with torch.no_grad():
            for h in set(range(4)) - set(heads):
                out_proj.weight[:, h * 4:(h + 1) * 4] = 0.0
    torch.testing.assert_close(small(x), reference(x), atol=1e-5, rtol=1e-5)
    # q, k, v and out lose half their rows/columns: 4 · 16 · 8 weights and 3 · 8 biases
    assert count_params(model) - count_params(small) == 2 * (4 * 16 * 8 + 3 * 8)
    assert count_macs(small, x[:1]) < count_macs(model, x[:1])


def test_the_weakest_heads_go():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 4, batch_first=True))
    model.forward = lambda x: model[0](x, x, x)[0]  # noqa: B023 - a one-off wrapper
    with torch.no_grad():
        model[0].out_proj.weight[:, 2:4] *= 1e-3  # head 1 (dims 2, 3) barely contributes
        model[0].in_proj_weight[[2, 3, 10, 11, 18, 19]] *= 1e-3
    assert heads_(model, ratio=0.25) == {"0": (0, 2, 3)}


def test_zero_ratio_swaps_without_changing_outputs():
    model = zoo.ViTMHA().eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    assert heads_(model, ratio=0.0) == dict.fromkeys(["blocks.0.attn", "blocks.1.attn"],
                                                      (0, 1, 2, 3))
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)


def test_channel_pruning_still_works_after_head_pruning():
    model = zoo.ViTMHA().eval()
    x = torch.randn(2, 3, 16, 16)
    heads_(model, ratio=0.5)
    small = pj.prune.channels(model, x, ratio=0.5)
    assert small.blocks[0].mlp[0].out_features == 16 and small(x).shape == (2, 10)


def test_pruned_heads_export_to_onnx_runtime(tmp_path):
    from penjing.export import onnx, ort_run

    model = zoo.ViTMHA().eval()
    heads_(model, ratio=0.5)
    x = torch.randn(2, 3, 16, 16)
    out = ort_run(onnx(model, tmp_path / "vit.onnx", x), x)[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), atol=1e-5, rtol=1e-4)


def test_bad_input_is_an_error():
    model = zoo.ViTMHA()
    with pytest.raises(ValueError, match=r"ratio must be a fraction of heads .* got 1"):
        heads_(model, ratio=1)
    with pytest.raises(ValueError, match="unknown head criterion 'bn'"):
        heads_(model, criterion="bn")
    with pytest.raises(UnsupportedLayerError, match="layer 'head' is not an attention layer"):
        heads_(model, layers=["head"])
    with pytest.raises(UnsupportedLayerError, match="has no nn.MultiheadAttention"):
        heads_(pj.models.create("lenet5"))
    odd = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(UnsupportedLayerError, match="uses add_bias_kv or add_zero_attn"):
        heads_(odd)
