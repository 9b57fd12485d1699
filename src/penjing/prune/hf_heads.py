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

Both are recorded in the model's history (`penjing.core.history`, ops "hf_heads" and "hf_ffn"),
so `pj.save(model, path)` and `pj.load(path, lambda: BertModel(config))` with the config the
model was built from replay the cuts before loading the weights. `count_hf_macs` counts what
the attention and FFN blocks cost per token, attention products included.

Importance: "l1" of a head's Q/K/V rows and output columns (a neuron's row and column), or
"activation": over a few batches, the mean norm of what the head (neuron) adds to the
output Linear's result, ||x_h · W_out[:, h]ᵀ||, so a head whose output projection is zero
scores zero.

>>> kept = pj.prune.hf_heads_(model, ratio=0.25, loader=batches, criterion="activation")
>>> pj.prune.hf_ffn_(model, ratio=0.5)
>>> model.save_pretrained(path); again = pj.prune.load_pretrained(type(model), path)
>>> pj.prune.count_hf_macs(model, tokens=128) / full   # fraction of the MACs left
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
from penjing.core import history
from penjing.core.steps import Step
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
        fused = any(name.rpartition(".")[2] in ("c_attn", "qkv", "query_key_value")
                    for name, _ in model.named_modules())
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no attention whose query, key and value are separate "
            f"Linear layers named {' / '.join('+'.join(n) for n in _QKV)}, so no heads to "
            "prune" + ("; fused QKV projections (GPT-2's c_attn) are not supported" if fused
                       else ""))
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
    if keep < n:
        _note_heads(model, kept_heads, n)
        history.record(model, {"op": "hf_heads", "layers": kept_heads})
    return kept_heads


def _note_heads(model: nn.Module, kept_heads: dict[str, list[int]], had: int) -> None:
    """Write the kept heads into `model.config`, as indices into the heads the config
    builds: a second cut (of layers that had `had` heads) is composed with the first."""
    config = getattr(model, "config", None)
    if config is None:
        return
    before = dict(getattr(config, KEPT_HEADS, None) or {})
    for name, kept in kept_heads.items():
        prior = before.get(name)  # stale when the layer was built whole from this config
        before[name] = [prior[i] for i in kept] if prior and len(prior) == had else list(kept)
    setattr(config, KEPT_HEADS, before)


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
    kept_neurons = {}
    for block, score in zip(blocks, scores, strict=True):
        kept = torch.argsort(score, descending=True, stable=True)[:keep].sort().values
        if keep < n:
            _keep_neurons(model, block, kept)
        kept_neurons[block.inner] = [int(i) for i in kept]
    if keep < n:
        _note_ffn(model, keep)
        history.record(model, {"op": "hf_ffn", "layers": kept_neurons})
    return {b.inner: keep for b in blocks}


def _keep_neurons(model: nn.Module, block: FFN, kept: torch.Tensor) -> None:
    _slice_linear(model, block.inner, kept, 0)
    _slice_linear(model, block.outer, kept, 1)


def _note_ffn(model: nn.Module, width: int) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        key = "intermediate_size" if hasattr(config, "intermediate_size") else "hidden_dim"
        setattr(config, key, width)


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


def _kept(where: str, kept: object, count: int, what: str) -> torch.Tensor:
    """`kept` as an index tensor, checked: a non-empty increasing list of ints < `count`."""
    if not (isinstance(kept, list) and kept and all(
            isinstance(i, int) and not isinstance(i, bool) for i in kept)):
        raise ValueError(f"{where}: kept {what} must be a non-empty list of ints, got {kept!r}")
    if kept[0] < 0 or kept[-1] >= count or any(b <= a for a, b in zip(kept, kept[1:],
                                                                       strict=False)):
        raise ValueError(f"{where} has {count} {what}; cannot keep {kept} (indices must be "
                         f"increasing, in 0..{count - 1}); the step belongs to another model")
    return torch.tensor(kept, dtype=torch.long)


def _replay_heads(model: nn.Module, kept: dict[str, list[int]]) -> int:
    """Cut the heads `kept` names; returns the head count the layers had."""
    layers = {a.name: a for a in attention_layers(model)}
    counts = {layers[n].heads for n in kept if n in layers}
    if len(counts) > 1:
        raise ValueError(f"attention layers have different head counts {sorted(counts)}; "
                         "the heads to keep were chosen on a model with one count")
    for name, heads in kept.items():
        if name not in layers:
            raise ValueError(f"{name!r} is not an attention layer of {type(model).__name__} "
                             f"(layers: {sorted(layers)}); its heads cannot be cut")
        index = _kept(f"attention {name!r}", heads, layers[name].heads, "heads")
        if len(index) < layers[name].heads:
            _keep_heads(model, layers[name], index)
    return counts.pop()


def replay_hf_(model: nn.Module, step: dict) -> None:
    """Cut `model` as a history step of `hf_heads_` ("hf_heads") or `hf_ffn_` ("hf_ffn")
    says, and update its config the same way; the weights are loaded afterwards. A
    ValueError when the step names layers or indices `model` does not have."""
    layers = step.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"a {step.get('op')!r} step needs a non-empty 'layers' dict, got "
                         f"{layers!r}")
    if step["op"] == "hf_heads":
        _note_heads(model, layers, _replay_heads(model, layers))
        return
    if step["op"] != "hf_ffn":
        raise ValueError(f"replay_hf_ replays 'hf_heads' and 'hf_ffn' steps, got {step['op']!r}")
    blocks = {b.inner: b for b in ffn_layers(model)}
    widths = {len(k) if isinstance(k, list) else 0 for k in layers.values()}
    if len(widths) != 1:
        raise ValueError(f"an 'hf_ffn' step keeps the same number of neurons in every block, "
                         f"got {sorted(widths)}")
    for name, neurons in layers.items():
        if name not in blocks:
            raise ValueError(f"{name!r} is not the first Linear of an FFN block of "
                             f"{type(model).__name__} (blocks: {sorted(blocks)})")
        width = model.get_submodule(name).out_features
        index = _kept(f"FFN {name!r}", neurons, width, "neurons")
        if len(index) < width:
            _keep_neurons(model, blocks[name], index)
    _note_ffn(model, widths.pop())


def count_hf_macs(model: nn.Module, tokens: int) -> int:
    """Multiply-accumulates per token of the attention and FFN blocks of `model` on
    sequences of `tokens` tokens: the Q, K, V and output projections, the two attention
    products (QKᵀ and AV, each `tokens` × heads × head size per token) and the two FFN
    Linear layers. Embeddings, pooler and task heads are left out: this is the encoder's
    cost, the part head and FFN pruning change. Counted from the layers' current shapes.

    >>> kept = pj.prune.count_hf_macs(pruned, 128) / pj.prune.count_hf_macs(model, 128)
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a sequence length, an int >= 1, got {tokens!r}")
    layers, blocks = attention_layers(model), ffn_layers(model)
    if not layers and not blocks:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no transformers attention or FFN blocks to count "
            "(see attention_layers / ffn_layers); use penjing.analysis.count_macs")
    total = 0
    for attn in layers:
        total += sum(model.get_submodule(n).weight.numel()
                     for n in (attn.q, attn.k, attn.v, attn.out))
        total += 2 * tokens * attn.heads * attn.head_size
    for block in blocks:
        total += sum(model.get_submodule(n).weight.numel() for n in (block.inner, block.outer))
    return total


HEADS_STEP = Step("hf_heads", history.replaying(replay_hf_), structural=True,
                  help="heads removed from Hugging Face attention (penjing.prune.hf_heads_)")
FFN_STEP = Step("hf_ffn", history.replaying(replay_hf_), structural=True,
                help="FFN neurons removed from Hugging Face blocks (penjing.prune.hf_ffn_)")
