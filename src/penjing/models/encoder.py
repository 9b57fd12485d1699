"""A tiny transformer encoder that reads a 28×28 image as 28 tokens (one per pixel row).

Built only from nn.Linear, nn.LayerNorm, nn.MultiheadAttention and plain attention
(softmax(q·kᵀ/√d)·v written out), so that it exercises what quantizing a transformer
needs, while it still trains on the bundled digits in seconds.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention written out: one qkv Linear, softmax, one output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, dim: int, heads: int, hidden: int, torch_attention: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # nn.MultiheadAttention in some blocks, the written-out version in the others
        self.attn = (
            nn.MultiheadAttention(dim, heads, batch_first=True)
            if torch_attention
            else Attention(dim, heads)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if isinstance(self.attn, Attention):
            x = x + self.attn(h)
        else:  # nn.MultiheadAttention, or the HeadAttention heads_ puts in its place
            x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyEncoder(nn.Module):
    """Rows as tokens → Linear embedding + learned positions → `depth` blocks (even ones
    with plain attention, odd ones with nn.MultiheadAttention) → LayerNorm → mean → Linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dim: int = 32,
        heads: int = 4,
        depth: int = 2,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.embed = nn.Linear(in_channels * image_size, dim)
        self.pos = nn.Parameter(torch.randn(image_size, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio * dim, torch_attention=i % 2 == 1) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) → (N, H, C·W): every pixel row is one token
        x = x.permute(0, 2, 1, 3).flatten(2)
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))
