"""Channel importance: a plain callable `(model, group) -> scores` with one score per channel.

Scores add up over every slice a channel owns across the coupled layers (its filter, the
matching input column of each consumer, a depthwise filter together with the pointwise conv
that reads it), so a channel counts by everything removing it would remove. A criterion may
return None for a group it cannot score (e.g. no BatchNorm for "bn"); that group is kept.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from penjing.prune.groups import Group, Slice
from penjing.train import LossFn, cross_entropy

Criterion = Callable[[nn.Module, Group], "torch.Tensor | None"]
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def _per_index(values: torch.Tensor, dim: int) -> torch.Tensor:
    return values.detach().movedim(dim, 0).reshape(values.shape[dim], -1).sum(dim=1)


def _gather(per_index: torch.Tensor, part: Slice) -> torch.Tensor:
    return torch.stack([per_index[torch.as_tensor(idx)].sum() for idx in part.indices])


def _weight_slices(model: nn.Module, group: Group) -> list[tuple[Slice, torch.Tensor]]:
    return [(s, s.tensor(model)) for s in group.slices
            if s.name == "weight" and isinstance(model.get_submodule(s.fqn), _WEIGHTED)]


def l1(model: nn.Module, group: Group) -> torch.Tensor:
    """Σ|w| over the channel's filters and input columns (Li et al., ICLR'17, across layers)."""
    total = torch.zeros(len(group))
    for part, weight in _weight_slices(model, group):
        total += _gather(_per_index(weight.abs(), part.dim), part).float()
    return total


def l2(model: nn.Module, group: Group) -> torch.Tensor:
    """√Σw² over the channel's filters and input columns."""
    total = torch.zeros(len(group))
    for part, weight in _weight_slices(model, group):
        total += _gather(_per_index(weight.float() ** 2, part.dim), part)
    return total.sqrt()


def bn_gamma(model: nn.Module, group: Group) -> torch.Tensor | None:
    """|γ| of the BatchNorm(s) on the channel (network slimming, Liu et al., ICCV'17)."""
    total, found = torch.zeros(len(group)), False
    for part in group.slices:
        module = model.get_submodule(part.fqn)
        if part.name == "weight" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            total += _gather(_per_index(module.weight.abs(), 0), part).float()
            found = True
    return total if found else None


def random(model: nn.Module, group: Group) -> torch.Tensor:
    """Uniform random scores: the control every real criterion has to beat.

    Seeded from the group's layers and torch's global seed, so a seeded run repeats.
    """
    seed = zlib.crc32(repr([(s.fqn, s.name, s.dim) for s in group.slices]).encode())
    seed ^= int(torch.initial_seed()) & 0xFFFFFFFF
    return torch.rand(len(group), generator=torch.Generator().manual_seed(seed))


class Taylor:
    """First-order Taylor importance |Σ θ·∂L/∂θ| over the channel's parameters (Molchanov
    et al., CVPR'19), with the gradient summed over `batches` of (inputs, targets).

    The gradient is computed once per model, on first use, before any surgery.
    """

    def __init__(self, batches: Iterable, loss_fn: LossFn = cross_entropy) -> None:
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("taylor needs at least one (inputs, targets) batch, got none")
        self.loss_fn = loss_fn
        self._products: dict[tuple[int, str], torch.Tensor] = {}
        self._model_id: int | None = None

    def _prepare(self, model: nn.Module) -> None:
        if self._model_id == id(model):
            return
        was_training = model.training
        model.eval()  # BN statistics must not move while we measure
        model.zero_grad(set_to_none=True)
        for x, y in self.batches:
            self.loss_fn(model, x, y).backward()
        self._products = {}
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.grad is not None:
                    self._products[(id(module), name)] = (p.detach() * p.grad).detach()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        self._model_id = id(model)

    def __call__(self, model: nn.Module, group: Group) -> torch.Tensor:
        self._prepare(model)
        total = torch.zeros(len(group))
        for part in group.slices:
            product = self._products.get((id(model.get_submodule(part.fqn)), part.name))
            if product is not None:
                total += _gather(_per_index(product, part.dim), part).float()
        return total.abs()


def taylor(batches: Iterable, loss_fn: LossFn = cross_entropy) -> Taylor:
    """A first-order Taylor criterion measured on `batches`; pass it as `criterion=`."""
    return Taylor(batches, loss_fn)


CRITERIA: dict[str, Criterion] = {"l1": l1, "l2": l2, "bn": bn_gamma, "random": random}


def resolve(criterion: str | Criterion) -> Criterion:
    """A criterion by name (one of CRITERIA) or the callable itself."""
    if callable(criterion):
        return criterion
    if criterion == "taylor":
        raise ValueError("criterion 'taylor' needs data: pass "
                         "criterion=penjing.prune.taylor(batches) with a few (x, y) batches")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of "
                         f"{sorted(CRITERIA)}, 'taylor' via penjing.prune.taylor(batches), "
                         "or pass a callable (model, group) -> scores")
    return CRITERIA[criterion]
