from __future__ import annotations

import pytest
import torch
from torch import nn

from penjing.models.encoder import Attention, TinyEncoder


def test_rows_are_tokens_and_logits_come_out():
    model = TinyEncoder(dim=32, heads=4, depth=2).eval()
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    kinds = [type(b.attn) for b in model.blocks]
    assert kinds == [Attention, nn.MultiheadAttention]  # both kinds of attention


def test_written_out_attention_matches_torch():
    torch.manual_seed(0)
    mine, ref = Attention(16, 4), nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(mine.qkv.weight)
        ref.in_proj_bias.copy_(mine.qkv.bias)
        ref.out_proj.weight.copy_(mine.proj.weight)
        ref.out_proj.bias.copy_(mine.proj.bias)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(mine(x), ref(x, x, x, need_weights=False)[0])


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="dim must be a multiple of heads"):
        TinyEncoder(dim=30, heads=4)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        TinyEncoder(depth=0)
