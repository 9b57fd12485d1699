"""Structured pruning of Hugging Face transformers: whole attention heads and FFN neurons.

Attention as transformers writes it has separate query / key / value Linear layers whose
outputs are reshaped into heads (`view(..., -1, head_size)`), and an output Linear that
reads the heads side by side. A head is found from the module structure: a module with
`query`/`key`/`value` (BERT, RoBERTa, ViT; output at the sibling `output.dense`) or
`q_lin`/`k_lin`/`v_lin`/`out_lin` (DistilBERT) or `q_proj`/`k_proj`/`v_proj`/`o_proj`
(ViT). Removing head h cuts its `head_size` rows
of Q, K and V and the same columns of the output Linear; the head count on the module is
updated, the head size stays. An FFN neuron is a row of the first FFN Linear and the
matching column of the second (`intermediate.dense` → `output.dense`, `ffn.lin1` →
`ffn.lin2`, `mlp.fc1` → `mlp.fc2`).

Every layer keeps the same number of heads and neurons (chosen per layer by importance),
so the config can describe the result: `intermediate_size` (DistilBERT: `hidden_dim`) is
updated and a plain `from_pretrained` reloads an FFN-pruned model. A BERT config derives
the head size from `hidden_size / num_attention_heads`, and transformers 5 dropped
`prune_heads` / `pruned_heads`, so no config field can say "12 heads of 32 → 9 heads of
32"; the kept heads are recorded in the config as `penjing_kept_heads` and
`load_pretrained` rebuilds the pruned shapes before loading the weights.

Importance: "l1" of a head's Q/K/V rows and output columns (a neuron's row and column), or
"activation": over a few batches, the mean norm of what the head (neuron) adds to the
output Linear's result, ||x_h · W_out[:, h]ᵀ||, so a head whose output projection is zero
scores zero.

>>> kept = pj.prune.hf_heads_(model, ratio=0.25, loader=batches, criterion="activation")
>>> pj.prune.hf_ffn_(model, ratio=0.5)
>>> model.save_pretrained(path); again = pj.prune.load_pretrained(type(model), path)
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing import inputs
from penjing.errors import UnsupportedLayerError

CRITERIA = ("l1", "activation")
KEPT_HEADS = "penjing_kept_heads"  # config entry: {attention module: kept head indices}


@dataclass(frozen=True)
class Attention:
    """Where one attention layer's heads live."""

    name: str  # the module holding Q, K, V and the head count
    q: str
    k: str
    v: str
    out: str
    heads: int
    head_size: int


@dataclass(frozen=True)
class FFN:
    """One feed-forward block: `inner` (hidden → neurons) and `outer` (neurons → hidden)."""

    inner: str
    outer: str


_QKV = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))
_OUT = ("out_lin", "o_proj", "out_proj")  # an output Linear in the same module


def attention_layers(model: nn.Module) -> list[Attention]:
    """The transformers attention layers of `model` whose heads can be pruned."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        names = next((n for n in _QKV if all(isinstance(getattr(module, c, None), nn.Linear)
                                               for c in n)), None)
        if names is None:
            continue
        prefix = f"{name}." if name else ""
        own = next((o for o in _OUT if isinstance(getattr(module, o, None), nn.Linear)), None)
        if own is not None:
            out = f"{prefix}{own}"
        else:
            parent = name.rpartition(".")[0]
            out = f"{parent}.output.dense" if parent else "output.dense"
            if not isinstance(modules.get(out), nn.Linear):
                raise UnsupportedLayerError(
                    f"attention {name!r} ({type(module).__name__}) has {names} but no output "
                    f"Linear at {out!r} or {_OUT}; its heads cannot be pruned")
        heads = getattr(module, "num_attention_heads", None) or getattr(module, "n_heads", None)
        size = getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
        if not isinstance(heads, int) or not isinstance(size, int):
            raise UnsupportedLayerError(
                f"attention {name!r} ({type(module).__name__}) does not say its head count "
                "and head size (num_attention_heads / n_heads, attention_head_size / head_dim)")
        q, k, v = (f"{prefix}{c}" for c in names)
        for part in (q, k, v):
            if modules[part].out_features != heads * size:
                raise UnsupportedLayerError(
                    f"{part!r} has {modules[part].out_features} outputs, not {heads} heads × "
                    f"{size}; the head count does not divide it")
        found.append(Attention(name, q, k, v, out, heads, size))
    return found


def ffn_layers(model: nn.Module) -> list[FFN]:
    """The feed-forward blocks of `model` (BERT-style `intermediate.dense` → `output.dense`,
    DistilBERT-style `lin1` → `lin2`, ViT-style `mlp.fc1` → `mlp.fc2`)."""
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        inner = getattr(getattr(module, "intermediate", None), "dense", None)
        outer = getattr(getattr(module, "output", None), "dense", None)
        if isinstance(inner, nn.Linear) and isinstance(outer, nn.Linear):
            found.append(FFN(f"{prefix}intermediate.dense", f"{prefix}output.dense"))
        for first, second in (("lin1", "lin2"), ("fc1", "fc2")):
            if isinstance(getattr(module, first, None), nn.Linear) and isinstance(
                    getattr(module, second, None), nn.Linear):
                found.append(FFN(f"{prefix}{first}", f"{prefix}{second}"))
    return found


def _slice_linear(model: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along `dim` of Linear `name` (0: outputs, 1: inputs), in place."""
    layer = model.get_submodule(name)
    if parametrize.is_parametrized(layer):
        raise ValueError(
            f"layer {name!r} carries masks or fake quantization; prune heads and neurons "
            "before masking or quantizing (or finalize_ first)")
    index = index.to(layer.weight.device)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.index_select(dim, index).clone())
        if dim == 0 and layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.index_select(0, index).clone())
    if dim == 0:
        layer.out_features = len(index)
    else:
        layer.in_features = len(index)


def _head_index(kept: torch.Tensor, size: int) -> torch.Tensor:
    return (kept[:, None] * size + torch.arange(size)).flatten()


def _keep_heads(model: nn.Module, attn: Attention, kept: torch.Tensor) -> None:
    index = _head_index(kept, attn.head_size)
    for part in (attn.q, attn.k, attn.v):
        _slice_linear(model, part, index, 0)
    _slice_linear(model, attn.out, index, 1)
    module = model.get_submodule(attn.name)
    for count in ("num_attention_heads", "n_heads"):
        if hasattr(module, count):
            setattr(module, count, len(kept))
    if hasattr(module, "all_head_size"):
        module.all_head_size = len(kept) * attn.head_size


@torch.no_grad()
def _contributions(model: nn.Module, outer: list[str], group: list[int], loader: Iterable,
                   batches: int) -> list[torch.Tensor]:
    """Per layer in `outer`, the mean over tokens of ||x_g · W[:, g]ᵀ|| for each group g of
    `group[i]` input columns of that Linear (a head, or a neuron for group 1)."""
    sums: list[torch.Tensor | float] = [0.0] * len(outer)
    handles = []
    for i, name in enumerate(outer):
        layer = model.get_submodule(name)

        def record(module, args, i=i, size=group[i]):  # noqa: ANN001 - hook signature
            x = args[0].detach().reshape(-1, module.in_features).float()
            w = module.weight.detach().float()
            x = x.reshape(len(x), -1, size)
            w = w.reshape(w.shape[0], -1, size)
            if size == 1:
                score = x.squeeze(-1).abs() * w.squeeze(-1).norm(dim=0)
            else:
                score = torch.einsum("ngd,ogd->ngo", x, w).norm(dim=-1)
            sums[i] = sums[i] + score.mean(0)

        handles.append(layer.register_forward_pre_hook(record))
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in itertools.islice(loader, batches):
            inputs.call(model, inputs.from_batch(batch, model))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("criterion 'activation' needs at least one batch, got an empty loader")
    return [s / seen for s in sums]


def _check(ratio: float, criterion: str, loader) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a fraction to remove in [0, 1), got {ratio!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    if criterion == "activation" and loader is None:
        raise ValueError("criterion 'activation' needs a loader of a few batches; pass "
                         "loader=, or use criterion='l1'")


def hf_heads_(
    model: nn.Module, ratio: float, *, criterion: str = "l1", loader: Iterable | None = None,
    batches: int = 4,
) -> dict[str, list[int]]:
    """Remove `ratio` of the heads of every transformers attention layer (the same count in
    each, at least one kept), in place; record the kept heads in `model.config`. Returns
    {attention module: kept head indices}.
    """
    _check(ratio, criterion, loader)
    layers = attention_layers(model)
    if not layers:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no attention with separate query/key/value (or "
            "q_lin/k_lin/v_lin) Linear layers; fused QKV projections (GPT-2's c_attn) are "
            "not supported")
    counts = {a.heads for a in layers}
    if len(counts) != 1:
        raise ValueError(f"attention layers have different head counts {sorted(counts)}; "
                         "prune from the model as configured")
    n = counts.pop()
    keep = max(1, n - math.floor(ratio * n))
    if criterion == "activation":
        scores = _contributions(model, [a.out for a in layers], [a.head_size for a in layers],
                                loader, batches)
    else:
        scores = [_l1_heads(model, a) for a in layers]
    kept_heads = {}
    for attn, score in zip(layers, scores, strict=True):
        kept = torch.argsort(score, descending=True, stable=True)[:keep].sort().values
        if keep < n:
            _keep_heads(model, attn, kept)
        kept_heads[attn.name] = [int(i) for i in kept]
    config = getattr(model, "config", None)
    if config is not None and keep < n:
        before = dict(getattr(config, KEPT_HEADS, None) or {})
        for name, kept in kept_heads.items():  # indices into the heads the config builds
            prior = before.get(name)
            before[name] = [prior[i] for i in kept] if prior else kept
        setattr(config, KEPT_HEADS, before)
    return kept_heads


def _l1_heads(model: nn.Module, attn: Attention) -> torch.Tensor:
    size = attn.head_size
    total = torch.zeros(attn.heads)
    for part in (attn.q, attn.k, attn.v):
        w = model.get_submodule(part).weight.detach().abs()
        total += w.reshape(attn.heads, size, -1).sum((1, 2))
    w = model.get_submodule(attn.out).weight.detach().abs()
    return total + w.reshape(w.shape[0], attn.heads, size).sum((0, 2))


def hf_ffn_(
    model: nn.Module, ratio: float, *, criterion: str = "l1", loader: Iterable | None = None,
    batches: int = 4,
) -> dict[str, int]:
    """Remove `ratio` of the intermediate neurons of every FFN block (the same count in
    each), in place, and set the config's `intermediate_size` (DistilBERT `hidden_dim`)
    so `save_pretrained` + `from_pretrained` rebuild it. Returns {inner Linear: kept}."""
    _check(ratio, criterion, loader)
    blocks = ffn_layers(model)
    if not blocks:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no FFN of intermediate.dense → output.dense or "
            "lin1 → lin2 Linear layers")
    widths = {model.get_submodule(b.inner).out_features for b in blocks}
    if len(widths) != 1:
        raise ValueError(f"FFN blocks have different widths {sorted(widths)}")
    n = widths.pop()
    keep = max(1, n - math.floor(ratio * n))
    if criterion == "activation":
        scores = _contributions(model, [b.outer for b in blocks], [1] * len(blocks), loader,
                                batches)
    else:
        scores = [model.get_submodule(b.inner).weight.detach().abs().sum(1)
                  + model.get_submodule(b.outer).weight.detach().abs().sum(0) for b in blocks]
    for block, score in zip(blocks, scores, strict=True):
        kept = torch.argsort(score, descending=True, stable=True)[:keep].sort().values
        if keep < n:
            _slice_linear(model, block.inner, kept, 0)
            _slice_linear(model, block.outer, kept, 1)
    config = getattr(model, "config", None)
    if config is not None and keep < n:
        key = "intermediate_size" if hasattr(config, "intermediate_size") else "hidden_dim"
        setattr(config, key, keep)
    return {b.inner: keep for b in blocks}


def load_pretrained(model_class: type[nn.Module], path: str | os.PathLike, **kwargs) -> nn.Module:
    """A transformers model saved with `save_pretrained` after `hf_heads_`, loaded through
    `model_class.from_pretrained(path, **kwargs)` with the recorded heads cut right after
    the model is built, so the saved weights (and transformers' key renames) fit. A
    model without pruned heads loads as usual."""
    config = model_class.config_class.from_pretrained(path)
    kept = getattr(config, KEPT_HEADS, None)
    if not kept:
        return model_class.from_pretrained(path, **kwargs)

    class Pruned(model_class):
        def __init__(self, config, *args, **kw):  # noqa: ANN001 - transformers' signature
            super().__init__(config, *args, **kw)
            _replay_heads(self, getattr(config, KEPT_HEADS))

    Pruned.__name__ = Pruned.__qualname__ = model_class.__name__
    Pruned.__module__ = model_class.__module__  # transformers finds its key renames by it
    loaded = Pruned.from_pretrained(path, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.__class__ = model_class
    return loaded


def _replay_heads(model: nn.Module, kept: dict[str, list[int]]) -> None:
    layers = {a.name: a for a in attention_layers(model)}
    for name, heads in kept.items():
        if name not in layers:
            raise ValueError(f"config {KEPT_HEADS} names {name!r}, which is not an attention "
                             f"layer of {type(model).__name__}; layers: {sorted(layers)}")
        _keep_heads(model, layers[name], torch.tensor(heads, dtype=torch.long))
