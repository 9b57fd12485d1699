"""Attention-head pruning: remove whole heads of multi-head attention layers for real.

torch's nn.MultiheadAttention ties its inner width to embed_dim (heads × head_dim must equal
it), so it cannot lose a head. `heads_` swaps each one for `HeadAttention`, which computes
the same thing with separate q/k/v/out Linear layers whose inner width is heads × head_dim,
then cuts the rows of q, k, v and the columns of the output projection that belong to the
least important heads. Removing a head is exactly zeroing its slice of the output projection
(Michel et al., NeurIPS'19 prune heads the same way).

    kept = pj.prune.heads_(model, ratio=0.5)     # {layer: kept head indices}
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.nn import functional as F

from penjing.core import history
from penjing.core.steps import Step
from penjing.errors import UnsupportedLayerError


class HeadAttention(nn.Module):
    """Multi-head attention with a free number of heads; nn.MultiheadAttention's interface."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, kdim: int | None = None,
                 vdim: int | None = None) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, name: str = "") -> HeadAttention:
        """The same attention as `mha`, with its weights."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedLayerError(
                f"attention {name!r} uses add_bias_kv or add_zero_attn, which head pruning "
                "does not handle; leave it out with layers="
            )
        e = mha.embed_dim
        new = cls(e, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                  batch_first=mha.batch_first, dropout=mha.dropout, kdim=mha.kdim,
                  vdim=mha.vdim)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                q, k, v = mha.in_proj_weight.chunk(3)
            else:
                q, k, v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w in ((new.q_proj, q), (new.k_proj, k), (new.v_proj, v)):
                proj.weight.copy_(w)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj),
                                   mha.in_proj_bias.chunk(3), strict=True):
                    proj.bias.copy_(b)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device).train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, H·d) → (N, H, T, d)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2  # (L, E), which nn.MultiheadAttention also takes
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q = self._heads(self.q_proj(query)) * self.head_dim ** -0.5
        k, v = self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1)  # (N, H, L, S)
        if attn_mask is None and is_causal:
            size = (scores.shape[-2], scores.shape[-1])
            attn_mask = torch.ones(size, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError("HeadAttention takes a 2-D (L, S) attn_mask; a per-head "
                                 "mask would have to follow the heads that were removed")
            scores = _masked(scores, attn_mask)
        if key_padding_mask is not None:
            scores = _masked(scores, key_padding_mask[:, None, None, :])
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(1, 2).flatten(2)
        out = self.out_proj(out)
        if unbatched:
            out, weights = out.squeeze(0), weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights  # over heads

    def macs(self, args: tuple, output: tuple) -> int:
        """The two attention products, QKᵀ and AV (the projections count as Linear layers)."""
        out = output[0]
        key = args[1] if len(args) > 1 else out  # called with keywords: count self-attention
        batched_first = self.batch_first and key.dim() == 3
        keys = key.shape[1] if batched_first else key.shape[0]
        return 2 * (out.numel() // out.shape[-1]) * keys * self.num_heads * self.head_dim

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, batch_first={self.batch_first}")


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Apply a bool (True = blocked) or additive float mask to attention scores."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def _head_scores(attn: HeadAttention, criterion: str, name: str) -> torch.Tensor:
    h, d = attn.num_heads, attn.head_dim
    if criterion == "random":
        seed = zlib.crc32(name.encode()) ^ (int(torch.initial_seed()) & 0xFFFFFFFF)
        return torch.rand(h, generator=torch.Generator().manual_seed(seed))
    p = 1 if criterion == "l1" else 2
    total = torch.zeros(h)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        total += proj.weight.detach().abs().pow(p).reshape(h, d, -1).sum(dim=(1, 2))
    total += attn.out_proj.weight.detach().abs().pow(p).reshape(-1, h, d).sum(dim=(0, 2))
    return total if p == 1 else total.sqrt()


def _keep_heads(attn: HeadAttention, kept: torch.Tensor) -> None:
    d = attn.head_dim
    index = (kept[:, None] * d + torch.arange(d)).flatten()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight = nn.Parameter(proj.weight.detach()[index].clone())
        if proj.bias is not None:
            proj.bias = nn.Parameter(proj.bias.detach()[index].clone())
        proj.out_features = len(index)
    attn.out_proj.weight = nn.Parameter(attn.out_proj.weight.detach()[:, index].clone())
    attn.out_proj.in_features = len(index)
    attn.num_heads = len(kept)


HEAD_CRITERIA = ("l1", "l2", "random")


def heads_(
    model: nn.Module, ratio: float = 0.5, *, criterion: str = "l1",
    layers: list[str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Remove `ratio` of the heads of every attention layer (at least one stays), in place.

    Attention layers are nn.MultiheadAttention (swapped for HeadAttention first) and
    HeadAttention. `criterion`: "l1"/"l2" of each head's q, k, v rows and output-projection
    columns, or "random" (the control). Returns the kept head indices per layer.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a fraction of heads to remove in [0, 1), got {ratio!r}")
    if criterion not in HEAD_CRITERIA:
        raise ValueError(f"unknown head criterion {criterion!r}; choose one of {HEAD_CRITERIA}")
    modules = dict(model.named_modules())
    found = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention | HeadAttention)]
    if layers is None:
        if not found:
            hf = any(c.__module__.startswith("transformers.") for c in type(model).__mro__)
            raise UnsupportedLayerError(
                f"{type(model).__name__} has no nn.MultiheadAttention or HeadAttention layer, "
                "so no heads to prune" + ("; for a Hugging Face transformers model use "
                                          "penjing.prune.hf_heads_ (and hf_ffn_ for the "
                                          "feed-forward neurons)" if hf else ""))
        layers = found
    for name in layers:
        if name not in found:
            raise UnsupportedLayerError(f"layer {name!r} is not an attention layer; attention "
                                        f"layers: {found}")
    kept_heads = {}
    for name in layers:
        attn = modules[name]
        if isinstance(attn, nn.MultiheadAttention):
            if not name:
                raise UnsupportedLayerError("the model itself is a MultiheadAttention; wrap it")
            attn = HeadAttention.from_mha(attn, name)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, attn)
        n = attn.num_heads
        keep = max(1, n - math.floor(ratio * n))
        scores = _head_scores(attn, criterion, name)
        kept = torch.argsort(scores, descending=True, stable=True)[:keep].sort().values
        if keep < n:
            _keep_heads(attn, kept)
        kept_heads[name] = tuple(int(i) for i in kept)
    history.record(model, {"op": "heads", "layers": {k: list(v) for k, v in kept_heads.items()}})
    return kept_heads


def replay_heads_(model: nn.Module, layers: dict[str, list[int]]) -> None:
    """Swap and cut attention layers as `heads_` did, from its returned {layer: kept}
    (weights are loaded afterwards). A ValueError when a layer is not attention."""
    for name, kept in layers.items():
        attn = model.get_submodule(name) if name else model
        if isinstance(attn, nn.MultiheadAttention):
            if not name:
                raise ValueError("the model itself is a MultiheadAttention")
            attn = HeadAttention.from_mha(attn, name)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, attn)
        if not isinstance(attn, HeadAttention):
            raise ValueError(f"layer {name!r} is {type(attn).__name__}, not attention")
        index = torch.tensor(kept, dtype=torch.long)
        if not len(kept) or int(index.min()) < 0 or int(index.max()) >= attn.num_heads:
            raise ValueError(f"layer {name!r} has {attn.num_heads} heads; cannot keep {kept}")
        if len(kept) < attn.num_heads:
            _keep_heads(attn, index)


STEP = Step(
    "heads", history.replaying(lambda m, step: replay_heads_(m, dict(step["layers"]))),
    structural=True,
    help="attention heads removed from nn.MultiheadAttention (penjing.prune.heads_)",
)
