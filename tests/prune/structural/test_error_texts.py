"""What the dependency graph says when it meets something it does not know: the fix it
prints names the right object and works when run as printed; Hugging Face models are sent
to hf_heads_ / hf_ffn_. The models are built here."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import penjing as pj
from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.prune.structural import ops

X = torch.randn(2, 3, 8, 8)


class FunctionalGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.group_norm(self.conv1(x), 2))


class Gate(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def forward(self, x):
        return x if bool(x.mean() > -1e9) else -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gate = nn.Conv2d(3, 8, 3, padding=1), Gate()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.gate(self.conv1(x)))


class Unfolded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.unfold = nn.Conv2d(3, 8, 3, padding=1), nn.Unfold(2, stride=2)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.unfold(self.conv(x)).transpose(1, 2)).mean(1)


def _printed_fix(err: pytest.ExceptionInfo) -> str:
    return re.search(r"penjing\.prune\.register_op\([^)]*\)", str(err.value)).group(0)


def test_the_group_norm_fix_names_the_functional_and_works_as_printed():
    model = FunctionalGroupNorm().eval()
    with pytest.raises(UnsupportedLayerError) as err:
        pj.prune.channels(model, X, ratio=0.5)
    fix = _printed_fix(err)
    assert fix == "penjing.prune.register_op(torch.nn.functional.group_norm, 'same')"
    try:
        eval(fix, {"penjing": pj, "torch": torch})  # noqa: S307 - our own message
        assert pj.prune.channels(model, X, ratio=0.5)(X).shape == (2, 8, 8, 8)
    finally:
        ops.FUNCTION_RULES.pop(F.group_norm, None)


def test_an_unknown_layer_is_told_how_to_register_it():
    model = Unfolded().eval()
    with pytest.raises(UnsupportedLayerError,
                       match=r"module 'unfold' \(Unfold\) is a layer the dependency graph does "
                       r"not know") as err:
        pj.prune.channels(model, X, ratio=0.5)
    fix = _printed_fix(err)
    assert fix == "penjing.prune.register_op(torch.nn.modules.fold.Unfold, 'opaque')"
    rules, leaves = list(ops.MODULE_RULES), list(ops.LEAVES)
    try:
        eval(fix, {"penjing": pj, "torch": torch})  # noqa: S307 - our own message
        with pytest.warns(PenjingWarning, match="8 of 8 channels stay: module 'unfold'"):
            small = pj.prune.channels(model, X, ratio=0.5)
        assert small(X).shape == (2, 4) and small.conv.out_channels == 8  # kept whole
    finally:
        ops.MODULE_RULES[:], ops.LEAVES[:] = rules, leaves


def test_an_untraceable_module_is_offered_the_opaque_registration():
    model = Gated().eval()
    with pytest.raises(UnsupportedLayerError, match=r"torch\.fx cannot trace module 'gate' "
                       r"\(Gate\).*penjing\.prune\.register_op\(TheClass, 'opaque'\)"):
        pj.prune.channels(model, X, ratio=0.5)
    rules, leaves = list(ops.MODULE_RULES), list(ops.LEAVES)
    try:
        pj.prune.register_op(Gate, "same")  # it acts on each channel alone
        small = pj.prune.channels(model, X, ratio=0.5)
        assert small.conv1.out_channels == 4 and small(X).shape == (2, 8, 8, 8)
    finally:
        ops.MODULE_RULES[:], ops.LEAVES[:] = rules, leaves


def _as_transformers(cls: type) -> type:
    """`cls` as if a transformers modeling module defined it (transformers is not needed)."""
    cls.__module__ = "transformers.models.tiny.modeling_tiny"
    return cls


@_as_transformers
class TinyHFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.embed(x)
        if bool(h.sum() > 0):  # the config-driven branches transformers models are full of
            h = h * 2
        return self.fc(h)


class T5Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.n_heads = 2


@_as_transformers
class TinyT5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = T5Attention()


def test_transformers_models_are_pointed_to_hf_heads_and_hf_ffn():
    model = TinyHFModel().eval()
    with pytest.raises(UnsupportedLayerError, match=r"Hugging Face transformers model, prune "
                       r"attention heads and FFN neurons with penjing\.prune\.hf_heads_ and "
                       r"penjing\.prune\.hf_ffn_"):
        pj.prune.channels(model, torch.randn(2, 4), ratio=0.5)
    with pytest.raises(UnsupportedLayerError, match=r"no nn\.MultiheadAttention or HeadAttention "
                       r"layer, so no heads to prune; for a Hugging Face transformers model use "
                       r"penjing\.prune\.hf_heads_"):
        pj.prune.heads_(model, ratio=0.5)


def test_t5_attention_is_not_said_to_be_fused():
    with pytest.raises(UnsupportedLayerError) as err:
        pj.prune.hf_heads_(TinyT5(), 0.5)
    text = str(err.value)
    assert "fused" not in text
    assert "separate Linear layers named query+key+value / q_lin+k_lin+v_lin" in text
