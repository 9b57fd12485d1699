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

from penjing.core import history
from penjing.core.checkpoint import load_state, read_checkpoint, save_checkpoint
from penjing.core.model_file import PRUNED_KEY
from penjing.core.steps import Step
from penjing.errors import FormatError, UnsupportedLayerError
from penjing.io import parse_json
from penjing.prune.structural.graph import DependencyGraph
from penjing.tracing import layer_class


@dataclass(frozen=True)
class Change:
    """Keep indices `kept` along `dim` of tensor `name` of module `fqn` (name "": attribute)."""

    fqn: str
    name: str
    dim: int
    kept: tuple[int, ...]


def plan(graph: DependencyGraph, removed: Iterable[int]) -> list[Change]:
    """The changes that remove the channel sets `removed` (ids from `Group.channels`)."""
    graph.sets.freeze()
    gone = np.zeros(len(graph.sets.parent), dtype=bool)
    gone[np.fromiter((int(r) for r in removed), dtype=np.int64)] = True
    changes = []
    for slot in sorted(graph.slots.values(), key=lambda s: s.order):
        roots = graph.sets.roots(slot.labels)
        kept = np.nonzero(~gone[roots])[0]
        if len(kept) < len(roots):
            if len(kept) == 0:
                raise ValueError(
                    f"pruning would remove every channel of {slot.fqn}.{slot.name}; keep at "
                    "least one channel per group (lower the ratio)"
                )
            changes.append(Change(slot.fqn, slot.name, slot.dim, tuple(kept.tolist())))
    return changes


def apply_(model: nn.Module, changes: Iterable[Change]) -> list[str]:
    """Slice every tensor named in `changes` and update layer attributes; returns changed modules.

    Weights under a parametrization (masks, shared weights) must be baked in first with
    `penjing.finalize_`.
    """
    changes = list(changes)
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
        if change.name.startswith("@"):  # an int attribute that sizes a reshape in forward
            attr = change.name[1:]
            if type(getattr(module, attr, None)) is not int:
                raise ValueError(f"{change.fqn or type(model).__name__}.{attr} is not an int "
                                 "attribute; the changes belong to a different architecture")
            setattr(module, attr, len(change.kept))
            continue
        if not change.name:
            continue
        tensor = getattr(module, change.name)
        index = torch.as_tensor(change.kept, dtype=torch.long, device=tensor.device)
        if len(change.kept) and int(index.max()) >= tensor.shape[change.dim]:
            raise ValueError(f"{change.fqn}.{change.name} has {tensor.shape[change.dim]} entries "
                             f"along dim {change.dim}, the change keeps index {int(index.max())}")
        new = tensor.detach().index_select(change.dim, index)  # a new tensor already
        if isinstance(tensor, nn.Parameter):
            setattr(module, change.name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            module._buffers[change.name] = new
    for fqn, counts in sizes.items():
        _sync(model.get_submodule(fqn), fqn, old[fqn], counts)
    if changes:
        history.record(model, {"op": "channels", "changes": changes_to_rows(changes)})
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
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (next(iter(counts.values())),)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = next(iter(counts.values()))
    elif isinstance(module, nn.MultiheadAttention):
        width = module.in_proj_weight.shape[1]
        module.embed_dim = module.kdim = module.vdim = width
        module.head_dim = width // module.num_heads
    elif layer_class(module) is None or all(name.startswith("@") for name, _ in counts):
        return  # parameters of the user's own module, or int attributes: nothing else to set
    else:
        raise UnsupportedLayerError(
            f"module {fqn!r} ({type(module).__name__}) has no known size attributes to update "
            "after slicing; structured surgery supports Conv, Linear, BatchNorm, PReLU, Embedding"
        )


def changes_to_rows(changes: Iterable[Change]) -> list[list]:
    """The change list as JSON-ready [module, tensor, dim, kept] rows."""
    return [[c.fqn, c.name, c.dim, list(c.kept)] for c in changes]


def save_pruned(model: nn.Module, changes: list[Change], path: str | os.PathLike) -> None:
    """Write the pruned weights as safetensors with the change list in its metadata, atomically."""
    meta = json.dumps(changes_to_rows(changes))
    save_checkpoint(model, path, metadata={PRUNED_KEY: meta})


_MAX_DIM = 8  # tensors of more dimensions than this are not sliced by structured pruning


def _changes_from_json(meta: object) -> list[Change]:
    """The change list in a file's metadata, each row checked for types and order (a row
    may only keep strictly increasing indices, so replaying it can only shrink a model)."""
    return changes_from_rows(parse_json(meta, "the change list"))


def changes_from_rows(rows: object) -> list[Change]:
    """Rows as `changes_to_rows` writes them, checked for types and order."""
    if not isinstance(rows, list):
        raise ValueError(f"the change list must be a JSON list, got {type(rows).__name__}")
    changes = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 4):
            raise ValueError(f"change {i} is not [module, tensor, dim, kept indices]")
        fqn, name, dim, kept = row
        if not (isinstance(fqn, str) and isinstance(name, str)):
            raise ValueError(f"change {i}: module and tensor must be strings")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < _MAX_DIM:
            raise ValueError(f"change {i}: dim must be an int in 0..{_MAX_DIM - 1}, got {dim!r}")
        if not (isinstance(kept, list) and kept and all(
                isinstance(k, int) and not isinstance(k, bool) for k in kept)):
            raise ValueError(f"change {i}: kept indices must be a non-empty list of ints")
        if kept[0] < 0 or any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
            raise ValueError(f"change {i}: kept indices must be non-negative and strictly "
                             "increasing")
        changes.append(Change(fqn, name, dim, tuple(kept)))
    return changes


def _check_against(model: nn.Module, changes: list[Change]) -> None:
    """Every change names a module and tensor of `model`, a dim it has and indices within
    its size (as already sliced by earlier changes): a ValueError otherwise."""
    sizes: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(changes):
        try:
            module = model.get_submodule(c.fqn)
        except AttributeError as err:
            raise ValueError(f"change {i}: no module {c.fqn!r} in {type(model).__name__}; "
                             "the file belongs to a different architecture") from err
        if not c.name or c.name.startswith("@"):  # no tensor, or an int attribute: apply_
            continue
        own = dict(module.named_parameters(recurse=False))
        own.update(module.named_buffers(recurse=False))
        tensor = own.get(c.name)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"change {i}: module {c.fqn!r} has no tensor {c.name!r}")
        shape = sizes.setdefault((c.fqn, c.name), list(tensor.shape))
        if c.dim >= len(shape) or c.kept[-1] >= shape[c.dim]:
            raise ValueError(f"change {i}: {c.fqn}.{c.name} of shape {tuple(shape)} cannot "
                             f"keep index {c.kept[-1]} along dim {c.dim}")
        shape[c.dim] = len(c.kept)


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a pruned model: replay the saved changes on a fresh `model`, then load weights.

    The whole change list and the weights are checked on a copy first: a file that does
    not fit is a FormatError and leaves `model` as it was.
    """
    import copy

    state, metadata = read_checkpoint(path, "pruned model", "penjing.prune.save_pruned")
    meta = metadata.get(PRUNED_KEY)
    if meta is None:
        raise FormatError(f"{str(path)!r} has no {PRUNED_KEY!r} metadata; write it with "
                          "penjing.prune.save_pruned")
    try:
        changes = _changes_from_json(meta)
    except ValueError as err:  # bad JSON, or not [fqn, name, dim, kept] rows
        raise FormatError(f"the {PRUNED_KEY!r} metadata of {str(path)!r} is not a list of "
                          f"[module, tensor, dim, kept indices] ({err}); write it with "
                          "penjing.prune.save_pruned") from err
    try:
        _check_against(model, changes)
        trial = copy.deepcopy(model)
        apply_(trial, changes)
        load_state(trial, state, path)
    except FormatError:
        raise
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, RuntimeError,
            UnsupportedLayerError) as err:
        raise FormatError(f"the {PRUNED_KEY!r} metadata of {str(path)!r} does not apply to "
                          f"this {type(model).__name__} ({err}); write it with "
                          "penjing.prune.save_pruned from this architecture") from err
    # The copy took every change and weight; the same steps on `model` cannot fail.
    apply_(model, changes)
    return load_state(model, state, path)


def _replay(model: nn.Module, record: dict, tensors) -> nn.Module:
    changes = changes_from_rows(record.get("changes"))
    _check_against(model, changes)
    apply_(model, changes)  # records the step again
    return model


STEP = Step("channels", _replay, structural=True,
            help="channels removed across coupled layers (penjing.prune.channels_)")
