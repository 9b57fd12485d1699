"""Structured pruning on models written the way packaged and torchvision models are: Conv2d
subclasses with their own padding, LayerNorm over channels through a permute, layer scales,
class tokens and position embeddings, nn.MultiheadAttention, wrapped functions, and
auxiliary heads that only train mode runs. Each is built here, tiny, with random weights."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from support_layers import SameConv2d
from torch import fx, nn
from torch.nn import functional as F

import penjing as pj
from penjing.core.counting import count_params
from penjing.errors import PenjingWarning, UnsupportedLayerError
from penjing.prune.structural import ops


class SameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(SameConv2d(3, 16, 3, 2, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.dw = nn.Sequential(SameConv2d(16, 16, 3, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(SameConv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth as a function that torch.fx keeps whole (as torchvision's is)."""
    if not training or p == 0:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1) >= p
    return x * keep / (1 - p)


fx.wrap("drop_path")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (torchvision's ConvNeXt writes it so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x):
        return x + drop_path(self.layer_scale * self.block(x), 0.1, self.training)


class ConvNeXtish(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim))
        self.stage1 = nn.Sequential(CNBlock(dim), CNBlock(dim))
        self.down = nn.Sequential(LayerNorm2d(dim), nn.Conv2d(dim, 2 * dim, 2, 2))
        self.stage2 = nn.Sequential(CNBlock(2 * dim))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.LayerNorm(2 * dim),
                                  nn.Linear(2 * dim, 10))

    def forward(self, x):
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.ln_1(x)
        h, _ = self.self_attention(h, h, h, need_weights=False)
        x = x + h
        return x + self.mlp(self.ln_2(x))


class VisionTransformerish(nn.Module):
    """torchvision's layout: the patch grid reshaped with self.hidden_dim, a class token
    concatenated before the patches, a learned position embedding, a head on token 0."""

    def __init__(self, dim: int = 32, heads: int = 4, patch: int = 4, image: int = 16) -> None:
        super().__init__()
        self.hidden_dim, self.patch_size = dim, patch
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) / 9)
        self.layers = nn.Sequential(EncoderBlock(dim, heads), EncoderBlock(dim, heads))
        self.ln = nn.LayerNorm(dim)
        self.heads = nn.Linear(dim, 10)

    def forward(self, x):
        n, _, h, w = x.shape
        x = self.conv_proj(x).reshape(n, self.hidden_dim, (h // self.patch_size) ** 2)
        x = x.permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        return self.heads(self.ln(self.layers(x))[:, 0])


class Outputs(NamedTuple):
    logits: torch.Tensor
    aux: torch.Tensor


class WithAux(nn.Module):
    """An auxiliary classifier that only train mode runs, as GoogLeNet's and Inception's,
    returned in a named tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.Flatten(1), nn.LazyLinear(10))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        mid = self.a(x)
        out = self.fc(self.b(mid).mean((2, 3)))
        if self.training:
            return Outputs(out, self.aux(mid))
        return out


def _train_step_works(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    out = model(x)
    loss = sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.fixture
def drop_path_rule():
    pj.prune.register_op(drop_path, "same")
    yield
    del ops.FUNCTION_RULES[drop_path]


CASES = {
    "same_padding": (SameNet, (2, 3, 15, 15), "head", 0.6),
    "convnext": (ConvNeXtish, (2, 3, 16, 16), "head.3", 0.35),
    "vit": (VisionTransformerish, (2, 3, 16, 16), "heads", 0.35),
}


@pytest.mark.parametrize("name", CASES)
def test_half_the_width_goes_and_the_pruned_model_trains(name, drop_path_rule):
    make, shape, head, bound = CASES[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    small = pj.prune.channels(model, x, ratio=0.5, ignored_layers=[head])
    assert small(x).shape == model(x).shape
    assert count_params(small) < bound * count_params(model)
    _train_step_works(small, x)
    same = pj.prune.channels(model, x, ratio=0.0)
    assert torch.equal(same.eval()(x), model(x))


def test_vit_hidden_dim_attribute_follows_the_width():
    torch.manual_seed(0)
    model, x = VisionTransformerish().eval(), torch.randn(2, 3, 16, 16)
    small = pj.prune.channels(model, x, ratio=0.5, ignored_layers=["heads"])
    assert small.hidden_dim == small.conv_proj.out_channels == 16
    attention = small.layers[0].self_attention
    assert (attention.embed_dim, attention.head_dim) == (16, 4)


def test_an_unknown_wrapped_function_names_the_op_and_the_registry():
    model = ConvNeXtish().eval()
    with pytest.raises(UnsupportedLayerError, match=r"op '.*drop_path' at node 'drop_path' in "
                       r"module 'stage1.0' is not one .* penjing.prune.register_op"):
        pj.prune.channels(model, torch.randn(1, 3, 16, 16), ratio=0.5)


def test_register_op_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown op rule 'elementwise'; choose one of"):
        pj.prune.register_op(drop_path, "elementwise")


def test_auxiliary_head_is_pruned_with_the_rest():
    torch.manual_seed(0)
    model, x = WithAux(), torch.randn(2, 3, 8, 8)
    model.train()(x)  # materialise the lazy layer
    model.eval()
    small = pj.prune.channels(model, x, ratio=0.5, ignored_layers=["fc", "aux.2"])
    assert small.a[0].out_channels == 8 and small.aux[0].in_channels == 8
    _train_step_works(small, x)


def test_fold_and_prune_find_the_subclassed_convs():
    model = SameNet().eval()
    folded = pj.quant.fold_bn_(model)
    assert [bn for _, bn in folded] == ["stem.1", "dw.1", "pw.1"]


def test_nothing_to_remove_warns_with_the_reason():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 36, 10)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 288))

    model = Fixed()
    with pytest.warns(PenjingWarning, match=r"removed nothing: no group .* conv.weight\[0\]: 8 "
                      r"of 8 channels stay: view .* writes the size of a channel dim"):
        pj.prune.channels(model, torch.randn(2, 3, 8, 8), ratio=0.5)


def test_explain_lists_groups_and_pinned_channels():
    model, x = VisionTransformerish().eval(), torch.randn(1, 3, 16, 16)
    text = pj.prune.explain(model, x)
    assert text.startswith("3 prunable group(s)")
    assert "conv_proj" in text.splitlines()[1] and "layers.0.self_attention" in text
    assert "heads.weight[0]: 10 of 10 channels stay: the model's output" in text


def test_inputs_that_do_not_fit_the_model_are_named_and_the_model_kept():
    model = SameNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"SameNet does not run on the example inputs "
                       r"\[\(2, 1, 15, 15\)\]: at module 'stem.0'"):
        pj.prune.channels_(model, torch.randn(2, 1, 15, 15), ratio=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_that_makes_cpu_tensors_in_forward_is_run_for_real():
    """The graph runs on the meta device when it can; a tensor made on the CPU inside
    forward cannot meet meta tensors, so the graph is built from a real run instead."""

    class Offsets(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x)
            y = y + torch.linspace(0, 1, y.shape[-1])  # made on the CPU, not on x's device
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    model, x = Offsets().eval(), torch.randn(2, 3, 8, 8)
    graph = pj.prune.structural.graph
    assert graph._on_meta(model, graph.trace(model), (x,)) is None
    small = pj.prune.channels(model, x, ratio=0.5)
    assert small.conv.out_channels == 4 and small(x).shape == (2, 4)
