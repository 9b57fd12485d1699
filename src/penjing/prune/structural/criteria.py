"""Channel importance: a plain callable `(model, group) -> scores` with one score per channel.

Weight scores (L1, L2, Taylor) add up over every slice a channel owns across the coupled
layers (its filter, the matching input column of each consumer, a depthwise filter together
with the pointwise conv that reads it), so a channel counts by everything removing it would
remove; BN γ is averaged over the channel's BatchNorms. A criterion may return None for a
group it cannot score (e.g. no BatchNorm for "bn"); that group is kept.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
from torch import nn

from penjing.core.modes import eval_mode
from penjing.prune.structural.groups import Group, Slice
from penjing.train import LossFn, cross_entropy

Criterion = Callable[[nn.Module, Group], "torch.Tensor | None"]
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def _per_index(values: torch.Tensor, dim: int,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over every dim but `dim`, one per index along `dim`. Where the rows are no
    view of `values`, they are copied into `scratch` if it fits (what reshape would copy,
    in the same layout, so the same sums)."""
    moved = values.detach().movedim(dim, 0)
    try:
        rows = moved.view(values.shape[dim], -1)
    except RuntimeError:  # not a view: reshape copies
        if (scratch is None or scratch.numel() < moved.numel() or scratch.dtype != moved.dtype
                or scratch.device != moved.device):
            rows = moved.reshape(values.shape[dim], -1)
        else:
            rows = scratch[: moved.numel()].view(moved.shape).copy_(moved)
            rows = rows.view(values.shape[dim], -1)
    return rows.sum(dim=1)


def _gather(per_index: torch.Tensor, part: Slice) -> torch.Tensor:
    """Σ per_index over each channel's indices, for all channels at once."""
    channels, each = part.indices.shape
    flat = torch.from_numpy(part.indices.reshape(-1).astype(np.int64))
    channel = torch.from_numpy(np.repeat(np.arange(channels), each))
    total = torch.zeros(channels, dtype=per_index.dtype)
    return total.index_add_(0, channel, per_index[flat])


def _weight_slices(model: nn.Module, group: Group) -> list[tuple[Slice, torch.Tensor]]:
    return [(s, s.tensor(model)) for s in group.slices
            if s.name == "weight" and isinstance(model.get_submodule(s.fqn), _WEIGHTED)]


def _is_pointwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1
            and all(k == 1 for k in module.kernel_size))


def _powers(model: nn.Module, group: Group, p: int) -> torch.Tensor:
    """Σ|w|^p over every weight a channel owns, a depthwise filter taken with its pointwise.

    A depthwise conv followed by a 1×1 conv is one separable conv whose weight for input
    channel i is the outer product dw[i] ⊗ pw[:, i]; its Σ|w|^p is the product of the two
    factors' sums (the seed notes' dw[0,:,:,:]·pw[:,i,:,:]). Scoring dw[i] and pw[:, i] each
    on its own would rank a channel with a large depthwise filter but a dead pointwise
    column as important.
    """
    parts = _weight_slices(model, group)
    sums = [_gather(_index_powers(w, s.dim, p), s) for s, w in parts]
    depthwise = [i for i, (s, _) in enumerate(parts) if s.role == "dw"]
    pointwise = [i for i, (s, _) in enumerate(parts)
                 if s.role == "in" and _is_pointwise(model.get_submodule(s.fqn))]
    total = torch.zeros(len(group))
    if depthwise and pointwise:
        pw = sum(sums[i] for i in pointwise)
        total += sum(sums[i] for i in depthwise) * pw
        paired = set(depthwise) | set(pointwise)
        sums = [v for i, v in enumerate(sums) if i not in paired]
    for v in sums:
        total += v
    return total


# Σ|w|^p per index of weights, kept while `shared_sums` is open (score_groups opens it):
# a weight's filters and its input channels are in two groups, and one |w|^p for both
# halves the passes over the weights, which are most of the time scoring takes.
_SHARED: ContextVar[dict | None] = ContextVar("penjing_shared_sums", default=None)


@contextmanager
def shared_sums() -> Iterator[None]:
    """Within this block, the L1 and L2 criteria compute |w|^p of a weight once, with its
    per-index sums along dims 0 and 1, for every group that reads the weight."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _index_powers(weight: torch.Tensor, dim: int, p: int) -> torch.Tensor:
    """Σ|w|^p over every dim but `dim`, one sum per index along `dim`."""
    shared = _SHARED.get()
    key = (id(weight), weight._version, p)
    if shared is not None and (key, dim) in shared:
        return shared[(key, dim)]
    w = weight.detach().float()
    # |w|^p and the copy a reshape may need go into one reused buffer: a fresh tensor for
    # each large weight costs about as much again in page faults as the arithmetic
    scratch = _scratch(2 * w.numel(), w.device, shared)
    powered = _power(w, p, scratch[: w.numel()])
    found = _per_index(powered, dim, scratch[w.numel():])
    if shared is not None:
        shared[(key, dim)] = found
        for other in {0, 1} - {dim}:
            if other < powered.dim():
                shared[(key, other)] = _per_index(powered, other, scratch[w.numel():])
    return found


def _scratch(size: int, device: torch.device, shared: dict | None) -> torch.Tensor:
    """A float32 buffer of at least `size` elements, kept in `shared` for the next weight."""
    found = shared.get("scratch") if shared is not None else None
    if found is None or found.numel() < size or found.device != device:
        found = torch.empty(size, device=device)
        if shared is not None:
            shared["scratch"] = found
    return found


def _power(w: torch.Tensor, p: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """|w|^p, written into the start of `scratch` where it fits (the same values, the
    same strides as a new tensor would have)."""
    if (scratch is not None and p in (1, 2) and w.is_contiguous() and w.dtype == scratch.dtype
            and w.device == scratch.device and w.numel() <= scratch.numel()):
        out = scratch[: w.numel()].view(w.shape)
        return torch.abs(w, out=out) if p == 1 else torch.square(w, out=out)
    return w.abs() if p == 1 else w.square() if p == 2 else w.abs() ** p


def l1(model: nn.Module, group: Group) -> torch.Tensor:
    """Σ|w| over the channel's filters and input columns (Li et al., ICLR'17, across layers)."""
    return _powers(model, group, 1)


def l2(model: nn.Module, group: Group) -> torch.Tensor:
    """√Σw² over the channel's filters and input columns."""
    return _powers(model, group, 2).sqrt()


def bn_gamma(model: nn.Module, group: Group) -> torch.Tensor | None:
    """Mean |γ| of the BatchNorms on the channel (network slimming, Liu et al., ICCV'17).

    The mean, not the sum: a channel on a residual stream passes through several
    BatchNorms, and summing would rank it above every single-BN channel in a global
    ranking regardless of its scales (measured: MobileNetV2 at half the MACs fine-tunes to
    80 % with the sum, 95 % with the mean). Within one group the two rank alike.
    """
    found = []
    for part in group.slices:
        module = model.get_submodule(part.fqn)
        if part.name == "weight" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.append(_gather(_per_index(module.weight.abs(), 0), part).float())
    return torch.stack(found).mean(dim=0) if found else None


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

    The gradient is measured once per model state, before any surgery: `prepare(model)`
    (which `penjing.prune.channels_` calls) measures it again, and a model whose parameters
    changed shape since is measured again on first use.
    """

    def __init__(self, batches: Iterable, loss_fn: LossFn = cross_entropy) -> None:
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("taylor needs at least one (inputs, targets) batch, got none; "
                             "pass a few batches of the training data")
        self.loss_fn = loss_fn
        self._products: dict[tuple[int, str], torch.Tensor] = {}
        self._signature: tuple | None = None

    @staticmethod
    def _signature_of(model: nn.Module) -> tuple:
        return (id(model), *((id(p), tuple(p.shape)) for p in model.parameters()))

    def prepare(self, model: nn.Module) -> None:
        """Measure θ·∂L/∂θ for every parameter of `model` on the batches."""
        saved = {p: p.grad for p in model.parameters()}  # leave the caller's gradients alone
        model.zero_grad(set_to_none=True)
        try:
            with eval_mode(model):  # BN statistics must not move while we measure
                for x, y in self.batches:
                    self.loss_fn(model, x, y).backward()
            self._products = {}
            for module in model.modules():
                for name, p in module.named_parameters(recurse=False):
                    if p.grad is not None:
                        self._products[(id(module), name)] = (p.detach() * p.grad).detach()
        finally:
            for p, grad in saved.items():
                p.grad = grad
        self._signature = self._signature_of(model)

    def __call__(self, model: nn.Module, group: Group) -> torch.Tensor:
        if self._signature != self._signature_of(model):
            self.prepare(model)
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
