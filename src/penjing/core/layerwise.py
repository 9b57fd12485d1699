"""Layer-wise compression on calibration data, one block at a time: what GPTQ, SparseGPT
and Wanda share.

A decoder language model is a stack of blocks. Each method needs, for every Linear layer of
a block, statistics of the inputs that layer sees (XᵀX, or the norm of each input feature)
when the blocks before it are already compressed, so that each layer corrects the error
of those before it. `compress_blocks_` captures the inputs of the first block once, then
for each block: records the statistics of its Linear layers with hooks, lets the method
change their weights, and runs the block again to give the next block its inputs. Peak
memory stays near one block's activations on the calibration set plus the weights.

A model that is not a stack of blocks (an MLP, a CNN, an encoder without a known layout)
is treated as one block: every Linear's statistics come from one pass of the whole model.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from penjing import inputs
from penjing.core.modes import eval_mode
from penjing.errors import PenjingWarning
from penjing.hf import is_conv1d, is_hf

# where transformers keeps the blocks of a decoder (or an encoder), by the attribute path
BLOCK_PATHS = (
    "model.layers",  # Llama, SmolLM, Qwen2, Mistral, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "layers",  # a bare decoder (LlamaModel and the like)
    "decoder.layers",
    "h",
    "encoder.layer",  # BERT, RoBERTa and their kin as bare models
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "distilbert.transformer.layer",
)


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or transformers' Conv1D (GPT-2: y = x @ W + b, W of (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out features, in features), whichever way the layer stores it."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def set_weight_matrix_(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the layer's own layout."""
    with torch.no_grad():
        module.weight.copy_(matrix.t() if is_conv1d(module) else matrix)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, blocks) of a transformers decoder, or None for a model of another layout."""
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return path, blocks
    return None


@dataclass
class LayerStats:
    """What one Linear layer saw on the calibration set."""

    hessian: torch.Tensor | None  # XᵀX / tokens (in × in), a float64 running mean
    sq_norms: torch.Tensor  # Σ x_j² per input feature j
    tokens: int = 0

    def add_(self, x: torch.Tensor, products: dict | None = None) -> None:
        """Add a batch of inputs. `products` caches (XᵀX, Σx²) by input tensor for one
        forward pass, so layers reading the same tensor (q, k and v) compute them once."""
        key = id(x)
        cached = products.get(key) if products is not None else None
        if cached is None or cached[0] is not x or cached[1] != x._version:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            gram = (flat.t() @ flat).double() if self.hessian is not None else None
            cached = (x, x._version, flat.shape[0], gram, flat.square().sum(dim=0).double())
            if products is not None:  # the tensor is held, so its id is not reused
                products[key] = cached
        _, _, n, gram, sq = cached
        total = self.tokens + n
        if self.hessian is not None:  # one batch's product in float32, the mean in float64
            if gram is None:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                gram = (flat.t() @ flat).double()
            self.hessian.mul_(self.tokens / total).add_(gram, alpha=1.0 / total)
        self.sq_norms.add_(sq)
        self.tokens = total


def without_dead_inputs(w: torch.Tensor, hessian: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w in float32, H in float64), copies, with the inputs that were always zero taken
    out of play: their weights set to 0 and their Hessian diagonal to 1 (so H inverts)."""
    w = w.float().clone()  # the column loops run in float32, as the reference does
    h = hessian.to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of H⁻¹ after damping, in float64 for its stability."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp_min(1e-12))
    for extra in (0.0, 0.1, 1.0):  # a nearly singular H (few tokens) gets more damping
        try:
            if extra:
                h.diagonal().add_(extra * h.diagonal().mean())
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("the calibration Hessian is not positive definite even with damping; "
                     "give more calibration tokens")


@dataclass
class _Captured:
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


class _Stop(Exception):
    """Raised by the hook on the first block: its inputs are all that is needed."""


def _capture_first_block(model: nn.Module, block: nn.Module, batches: Sequence) -> _Captured:
    captured = _Captured()

    def hook(_module, args, kwargs):
        captured.args.append(tuple(args))
        captured.kwargs.append(dict(kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                inputs.call(model, _no_cache(model, batch))
    finally:
        handle.remove()
    if len(captured.args) != len(batches):
        raise RuntimeError(f"the first block ran on {len(captured.args)} of {len(batches)} "
                           "calibration batches; does the model's forward call its blocks?")
    return captured


def _no_cache(model: nn.Module, batch: Any) -> Any:
    """The batch as keyword inputs, with the key/value cache off: the blocks are called
    again and again on the same inputs, and a cache would grow between calls."""
    batch = inputs.from_batch(batch, model)
    if not is_hf(model):
        return batch
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if isinstance(batch, Mapping):
        return {**batch, "use_cache": False}
    return batch


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _collect(block: nn.Module, linears: dict[str, nn.Module], run: Callable[[], None],
             hessian: bool) -> dict[str, LayerStats]:
    stats = {}
    products: dict = {}  # what one forward pass has computed, by input tensor
    handles = [block.register_forward_pre_hook(lambda *_: products.clear())]
    for name, layer in linears.items():
        n = weight_matrix(layer).shape[1]
        stats[name] = LayerStats(torch.zeros(n, n, dtype=torch.float64) if hessian else None,
                                 torch.zeros(n, dtype=torch.float64))

        def hook(_m, args, name=name):
            stats[name].add_(args[0], products)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        products.clear()
    return stats


# a method: (layer name, layer, what it saw) -> what it did (anything, returned by name)
LayerMethod = Callable[[str, nn.Module, LayerStats], Any]
# a method that sees a whole block at once: (its chosen layers by name, what each saw, a call
# that runs the block on the calibration inputs again, on the first `limit` batches when given)
# -> what it did, by layer name. For
# methods whose choice couples layers, as AWQ's scales couple the layers reading one norm.
BlockMethod = Callable[[dict[str, nn.Module], dict[str, LayerStats], Callable[..., None]],
                       dict[str, Any]]


@torch.no_grad()
def compress_blocks_(
    model: nn.Module,
    calib: Iterable,
    method: LayerMethod | None = None,
    *,
    block_method: BlockMethod | None = None,
    layers: Callable[[nn.Module, str], bool] | None = None,
    batches: int | None = None,
    progress: Callable[[str], None] | None = None,
    hessian: bool = True,
) -> dict[str, Any]:
    """Run `method` on every chosen Linear layer of `model`, block by block, in place.

    `calib` yields batches (token ids, dicts of keyword tensors, or (inputs, labels));
    `batches` caps how many are used. `layers(module, name)` picks layers (default: every
    Linear inside the blocks, or every Linear of a model without blocks; a decoder's head
    stays as it is). `hessian=False` skips XᵀX (Wanda reads only the feature norms; it is
    most of the time on a wide layer). Returns what `method` returned, by layer name.
    `block_method` replaces `method` for a method that handles a block's layers together.
    """
    if (method is None) == (block_method is None):
        raise TypeError("compress_blocks_ takes either method or block_method")
    if block_method is None:
        def block_method(chosen, stats, _run):
            return {name: method(name, layer, stats[name]) for name, layer in chosen.items()}
    data = list(itertools.islice(calib, batches))
    if not data:
        raise ValueError("layer-wise compression needs calibration batches, got none; pass a "
                         "few dozen sequences of real text (or inputs like the model's)")
    say = progress or (lambda _m: None)
    found = decoder_blocks(model)
    done: dict[str, Any] = {}
    with eval_mode(model):
        if found is None:
            if is_hf(model) and any(is_linear(m) for m in model.modules()):
                warnings.warn(
                    f"no list of blocks found in {type(model).__name__} (looked at "
                    f"{', '.join(BLOCK_PATHS)}); compressing it as one block, which keeps "
                    "every layer's calibration activations at once and lets no layer correct "
                    "the error of those before it", PenjingWarning, stacklevel=3)
            chosen = _chosen(model, "", layers)

            def run_all(limit=None):
                for b in itertools.islice(data, limit):
                    inputs.call(model, _no_cache(model, b))

            stats = _collect(model, chosen, run_all, hessian)
            return _checked(block_method(chosen, stats, run_all), model)
        path, blocks = found
        captured = _capture_first_block(model, blocks[0], data)
        hidden = [a[0] for a in captured.args]
        for i, block in enumerate(blocks):
            prefix = f"{path}.{i}"
            chosen = _chosen(block, prefix, layers)

            def run(limit=None, block=block, hidden=hidden):
                for h, args, kwargs in itertools.islice(
                        zip(hidden, captured.args, captured.kwargs, strict=True), limit):
                    block(h, *args[1:], **kwargs)

            if chosen:
                stats = _collect(block, chosen, run, hessian)
                done |= block_method(chosen, stats, run)
            hidden = [_first_output(block(h, *args[1:], **kwargs))
                      for h, args, kwargs in zip(hidden, captured.args, captured.kwargs,
                                                 strict=True)]
            say(f"block {i + 1}/{len(blocks)}: {len(chosen)} layers")
    return _checked(done, model)


def block_linears(model: nn.Module, layers: Callable[[nn.Module, str], bool] | None = None
                  ) -> dict[str, nn.Module]:
    """The Linear layers `compress_blocks_` would visit, by name: those inside a decoder's
    blocks (or all of a model without blocks) that `layers` accepts."""
    found = decoder_blocks(model)
    if found is None:
        return _checked(_chosen(model, "", layers), model)
    path, blocks = found
    chosen = {}
    for i, block in enumerate(blocks):
        chosen |= _chosen(block, f"{path}.{i}", layers)
    return _checked(chosen, model)


def _chosen(root: nn.Module, prefix: str, layers) -> dict[str, nn.Module]:
    out = {}
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if name and is_linear(module) and (layers is None or layers(module, full)):
            out[full] = module
    return out


def _checked(done: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    if not done:
        raise ValueError(f"no Linear layer of {type(model).__name__} was chosen for "
                         "layer-wise compression; check `layers`")
    return done
