"""Surgery: cut pruned channels out of weights for real and keep a replayable record of it.

The record is a list of `Change(fqn, name, dim, kept)`: which indices of which tensor stay.
Replaying it on a freshly built model of the same architecture gives the pruned shapes, so
a pruned model is saved as that list plus a state_dict, never as pickled modules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.errors import FormatError, UnsupportedLayerError
from penjing.prune.graph import DependencyGraph
from penjing.train import load_state, read_checkpoint, save_checkpoint

METADATA_KEY = "penjing.prune.changes"


@dataclass(frozen=True)
class Change:
    """Keep indices `kept` along `dim` of tensor `name` of module `fqn` (name "": attribute)."""

    fqn: str
    name: str
    dim: int
    kept: tuple[int, ...]


def plan(graph: DependencyGraph, removed: Iterable[int]) -> list[Change]:
    """The changes that remove the channel sets `removed` (ids from `Group.channels`)."""
    removed = np.fromiter((int(r) for r in removed), dtype=np.int64)
    changes = []
    for slot in sorted(graph.slots.values(), key=lambda s: s.order):
        roots = graph.sets.roots(slot.labels)
        kept = np.nonzero(~np.isin(roots, removed))[0]
        if len(kept) < len(roots):
            if len(kept) == 0:
                raise ValueError(
                    f"pruning would remove every channel of {slot.fqn}.{slot.name}; keep at "
                    "least one channel per group (lower the ratio)"
                )
            changes.append(Change(slot.fqn, slot.name, slot.dim, tuple(int(i) for i in kept)))
    return changes


def apply_(model: nn.Module, changes: Iterable[Change]) -> list[str]:
    """Slice every tensor named in `changes` and update layer attributes; returns changed modules.

    Weights under a parametrization (masks, shared weights) must be baked in first with
    `penjing.finalize_`.
    """
    sizes: dict[str, dict[tuple[str, int], int]] = {}
    old: dict[str, tuple] = {}
    for change in changes:
        try:
            module = model.get_submodule(change.fqn)
        except AttributeError as err:
            raise ValueError(f"no module {change.fqn!r} in {type(model).__name__}; the changes "
                             "belong to a different architecture") from err
        if change.fqn not in old:
            old[change.fqn] = _attributes(module)
        if parametrize.is_parametrized(module):
            raise ValueError(f"module {change.fqn!r} carries a parametrization (a mask?); "
                             "call penjing.finalize_(model) before structured pruning")
        sizes.setdefault(change.fqn, {})[(change.name, change.dim)] = len(change.kept)
        if not change.name:
            continue
        tensor = getattr(module, change.name)
        index = torch.as_tensor(change.kept, dtype=torch.long, device=tensor.device)
        if len(change.kept) and int(index.max()) >= tensor.shape[change.dim]:
            raise ValueError(f"{change.fqn}.{change.name} has {tensor.shape[change.dim]} entries "
                             f"along dim {change.dim}, the change keeps index {int(index.max())}")
        new = tensor.detach().index_select(change.dim, index).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, change.name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            module._buffers[change.name] = new
    for fqn, counts in sizes.items():
        _sync(model.get_submodule(fqn), fqn, old[fqn], counts)
    return list(sizes)


def _attributes(module: nn.Module) -> tuple:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (module.in_channels, module.out_channels, module.groups)
    return ()


def _sync(module: nn.Module, fqn: str, old: tuple, counts: dict[tuple[str, int], int]) -> None:
    """Make the layer's size attributes agree with its new tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        cin, cout, groups = old
        if groups > 1 and groups == cin == cout:  # depthwise: in, out and groups move together
            module.in_channels = module.out_channels = module.groups = module.weight.shape[0]
        else:
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = next(iter(counts.values()))
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    else:
        raise UnsupportedLayerError(
            f"module {fqn!r} ({type(module).__name__}) has no known size attributes to update "
            "after slicing; structured surgery supports Conv, Linear, BatchNorm, PReLU, Embedding"
        )


def save_pruned(model: nn.Module, changes: list[Change], path: str | os.PathLike) -> None:
    """Write the pruned weights as safetensors with the change list in its metadata, atomically."""
    meta = json.dumps([[c.fqn, c.name, c.dim, list(c.kept)] for c in changes])
    save_checkpoint(model, path, metadata={METADATA_KEY: meta})


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a pruned model: replay the saved changes on a fresh `model`, then load weights."""
    state, metadata = read_checkpoint(path, "pruned model", "penjing.prune.save_pruned")
    meta = metadata.get(METADATA_KEY)
    if meta is None:
        raise FormatError(f"{str(path)!r} has no {METADATA_KEY!r} metadata; write it with "
                          "penjing.prune.save_pruned")
    try:
        changes = [Change(fqn, name, int(dim), tuple(int(i) for i in kept))
                   for fqn, name, dim, kept in json.loads(meta)]
    except (ValueError, TypeError) as err:  # bad JSON, or not [fqn, name, dim, kept] rows
        raise FormatError(f"the {METADATA_KEY!r} metadata of {str(path)!r} is not a list of "
                          f"[module, tensor, dim, kept indices] ({err}); write it with "
                          "penjing.prune.save_pruned") from err
    apply_(model, changes)
    return load_state(model, state, path)
