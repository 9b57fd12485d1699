"""`distill_hidden_`: train a student encoder to give the teacher's hidden states, on
unlabelled inputs.

A sentence-embedding model (or any encoder whose output is read as features) has no
logits to soften: what a pruned copy must keep is its last hidden state, or the
mean-pooled embedding read from it. After head and FFN pruning a short pass of this
recovers most of what the cut lost, with text that carries no labels. Batches are dicts
of keyword inputs (`{"input_ids", "attention_mask"}`) or anything `penjing.inputs` reads;
the model's first output (`last_hidden_state`) is compared, padding left out.

>>> pj.distill.distill_hidden_(teacher, pruned, batches, epochs=2, lr=5e-5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from penjing import inputs
from penjing.core.modes import eval_mode
from penjing.train import History, fit

# (student hidden, teacher hidden, token mask (N, T) of 0/1 or None) → scalar loss
HiddenLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(N, T, D) hidden states → (N, D): the mean over the tokens `mask` keeps (all when
    None), as sentence-transformers pools an embedding."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be (batch, tokens, features), got shape "
                         f"{tuple(hidden.shape)}")
    if mask is None:
        return hidden.mean(1)
    weight = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1e-9)


def cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """1 − cosine of the mean-pooled embeddings: what embeddings are compared by."""
    s, t = mean_pool(student, mask), mean_pool(teacher, mask)
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def pooled_mse(student: torch.Tensor, teacher: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of the mean-pooled embeddings (keeps their length too)."""
    return F.mse_loss(mean_pool(student, mask), mean_pool(teacher, mask))


def token_mse(student: torch.Tensor, teacher: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of every kept token's hidden state."""
    if mask is None:
        return F.mse_loss(student, teacher)
    keep = mask.bool()
    return F.mse_loss(student[keep], teacher[keep])


HIDDEN_LOSSES: dict[str, HiddenLoss] = {"cosine": cosine, "pooled_mse": pooled_mse,
                                        "token_mse": token_mse}


def _resolve(loss: str | HiddenLoss) -> HiddenLoss:
    if callable(loss):
        return loss
    if loss not in HIDDEN_LOSSES:
        raise ValueError(f"unknown hidden-state loss {loss!r}; choose one of "
                         f"{sorted(HIDDEN_LOSSES)} or pass a function (student, teacher, mask)")
    return HIDDEN_LOSSES[loss]


class _Pairs:
    """A loader's batches as (inputs, None), the pairs `fit` unpacks; re-iterable."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self):
        return ((inputs.from_batch(batch), None) for batch in self.loader)


class _SizedPairs(_Pairs):
    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def _mask(x: object) -> torch.Tensor | None:
    return x.get("attention_mask") if isinstance(x, Mapping) else None


class HiddenLossFn:
    """The hidden-state distillation loss as a `penjing.train.fit` loss_fn(model, x, _y):
    `loss` between the student's and the (frozen, eval-mode) teacher's first outputs."""

    def __init__(self, teacher: nn.Module, loss: str | HiddenLoss = "cosine") -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher.eval()
        self.loss = _resolve(loss)

    def __call__(self, model: nn.Module, x: object, _y: object) -> torch.Tensor:
        with torch.no_grad():
            target = inputs.first_tensor(inputs.call(self.teacher, x))
        out = inputs.first_tensor(inputs.call(model, x))
        if out.shape != target.shape:
            raise ValueError(
                f"the student's output has shape {tuple(out.shape)}, the teacher's "
                f"{tuple(target.shape)}; hidden-state distillation needs the same hidden "
                "size (prune heads and FFN neurons, not the hidden width)")
        return self.loss(out, target, _mask(x))


def distill_hidden_(
    teacher: nn.Module,
    student: nn.Module,
    loader: Iterable,
    *,
    loss: str | HiddenLoss = "cosine",
    epochs: int = 1,
    lr: float = 5e-5,
    optimizer: str | torch.optim.Optimizer = "adamw",
    schedule: str = "cosine",
    seed: int | None = 0,
    progress: bool = True,
) -> History:
    """Train `student` in place so its first output (last hidden state) matches the
    teacher's on `loader`'s unlabelled batches; returns the loss per epoch.

    `loss`: "cosine" (1 − cosine of mean-pooled embeddings, padding left out),
    "pooled_mse", "token_mse", or a function (student, teacher, mask) → loss. The
    teacher runs in eval mode without gradients and is never changed; the student trains
    through `penjing.train.fit` (dropout on, learning rate along `schedule`).
    """
    if teacher is student:
        raise ValueError("teacher and student are the same module; distil into a pruned copy "
                         "(copy.deepcopy the teacher before pruning)")
    pairs = _SizedPairs(loader) if hasattr(loader, "__len__") else _Pairs(loader)
    with eval_mode(teacher):  # the teacher leaves in the mode it came in
        loss_fn = HiddenLossFn(teacher, loss)
        return fit(student, pairs, epochs=epochs, lr=lr, optimizer=optimizer,
                   loss_fn=loss_fn, seed=seed, progress=progress, desc="distill hidden",
                   schedule=schedule)


@torch.no_grad()
def hidden_loss(teacher: nn.Module, student: nn.Module, loader: Iterable,
                loss: str | HiddenLoss = "cosine") -> float:
    """The mean of `loss` over `loader`'s batches, both models in eval mode: how far the
    student is from the teacher before and after `distill_hidden_`."""
    total, batches = 0.0, 0
    with eval_mode(teacher, student):
        fn = HiddenLossFn(teacher, loss)
        for batch in loader:
            total += float(fn(student, inputs.from_batch(batch), None))
            batches += 1
    if batches == 0:
        raise ValueError("the loader gave no batches; give it at least one")
    return total / batches
