"""ConvNeXt V2's Global Response Normalization (as timm writes it, built here): the mean of
the channel norms it divides by is a statistic over the channels, like LayerNorm's, so the
MLP around it is pruned instead of kept whole."""

from __future__ import annotations

import torch
from torch import nn

import penjing as pj
from penjing.core.counting import count_params


class GlobalResponseNorm(nn.Module):
    """GRN on channels-last input: x + bias + weight · x · (‖x‖ over H, W) / mean over C."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.rand(dim)), nn.Parameter(torch.rand(dim))

    def forward(self, x):
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1),
                                 x * x_n)


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.grn = GlobalResponseNorm(4 * dim)

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.fc2(self.grn(nn.functional.gelu(self.fc1(y))))
        return x + y.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 16, 2, stride=2), ConvNeXtV2Block()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_the_mlp_around_grn_is_pruned_with_its_weight_and_bias():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    small = pj.prune.channels(model, x, ratio=0.5, ignored_layers=["head"])
    block = small.block
    assert block.fc1.out_features == 32 and block.fc2.in_features == 32
    assert block.grn.weight.shape == block.grn.bias.shape == (32,)
    assert count_params(small) < 0.55 * count_params(model)
    assert small(x).shape == (2, 4)
    small.train()
    small(x).sum().backward()
    assert block.grn.weight.grad.shape == (32,)
