"""Train and evaluate loops: seeded, deterministic on CPU, with a progress bar."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from penjing import distributed, inputs

# checkpoint files and eval_mode live on the ground floor (penjing.core); `pj.train` keeps
# the names users call
from penjing.core.checkpoint import load_checkpoint as load_checkpoint
from penjing.core.checkpoint import save_checkpoint as save_checkpoint
from penjing.core.modes import eval_mode

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so that a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default training loss: cross-entropy of the model's logits."""
    return nn.functional.cross_entropy(model(x), y)


def with_penalty(
    penalty: Callable[[nn.Module], torch.Tensor], base: LossFn = cross_entropy
) -> LossFn:
    """`base` loss plus `penalty(model)`, as a `loss_fn(model, x, y)` for `fit`: how a
    regularizer (BN-γ L1, group lasso, a filter skeleton's L1) joins any training loop."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return base(model, x, y) + penalty(model)

    return loss_fn


SCHEDULES = ("constant", "cosine")


def make_optimizer(
    params: Iterable[torch.nn.Parameter], name: str = "adam", lr: float = 1e-3, **kwargs
) -> torch.optim.Optimizer:
    """An optimizer by name: 'adam', 'adamw' or 'sgd' (momentum 0.9 unless given)."""
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adam', 'adamw' or 'sgd'")


@dataclass
class History:
    """Mean training loss per epoch, and test accuracy per epoch when a test loader was given."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    optimizer: str | torch.optim.Optimizer = "adam",
    loss_fn: LossFn = cross_entropy,
    test_loader: Iterable | None = None,
    seed: int | None = 0,
    progress: bool = True,
    desc: str = "train",
    schedule: str = "constant",
) -> History:
    """Train `model` in place for `epochs` epochs and return its loss (and accuracy) history.

    `loss_fn(model, x, y)` returns the loss of one batch, so extra terms (a sparsity
    penalty, a distillation loss) plug in without a new loop. `schedule`: "constant"
    keeps the learning rate; "cosine" lowers it from its start to 0 along a half cosine,
    step by step (epoch by epoch for a loader without a length), and gives a caller's
    optimizer back with its starting rate.

    Under torchrun (see penjing.distributed) every rank trains on its share of each
    epoch with gradients averaged over ranks: the model starts from rank 0's weights,
    ranks end with the same weights and buffers, the history is the mean over ranks,
    and only rank 0 shows progress. `seed` then seeds rank r with seed + r.
    """
    from tqdm.auto import tqdm


    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    spread = distributed.init()
    if seed is not None:
        seed_everything(seed + distributed.rank())  # dropout differs by rank, as data does
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else (
        make_optimizer(model.parameters(), optimizer, lr)
    )
    params = [p for group in opt.param_groups for p in group["params"]]
    if spread:
        distributed.broadcast_(model)
        own = {id(p) for p in model.parameters()}  # a caller's optimizer may train more
        distributed.broadcast_([p for p in params if id(p) not in own])
        train_loader = distributed.shard(train_loader, seed=seed or 0)
        progress = progress and distributed.is_main()
    per_step = hasattr(train_loader, "__len__")
    scheduler, start_lrs = None, [group["lr"] for group in opt.param_groups]
    if schedule == "cosine":
        steps = max(epochs * (len(train_loader) if per_step else 1), 1)  # type: ignore[arg-type]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
        )
    history = History()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        total, batches = 0.0, 0
        if spread:
            distributed.set_epoch(train_loader, epoch)
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y)
            loss.backward()
            if spread:
                distributed.all_reduce_grads_(params)
            opt.step()
            if scheduler is not None and per_step:
                scheduler.step()
            total += float(loss.detach())
            batches += 1
        if scheduler is not None and not per_step:
            scheduler.step()
        if spread:  # BatchNorm statistics saw other batches on each rank: take rank 0's
            distributed.broadcast_buffers_(model)
            total, batches = distributed.all_reduce(total, "sum"), distributed.all_reduce(
                batches, "sum")
        history.loss.append(total / max(batches, 1))
        postfix = {"loss": f"{history.loss[-1]:.4f}"}
        if test_loader is not None:
            history.accuracy.append(evaluate(model, test_loader))
            postfix["acc"] = f"{history.accuracy[-1]:.4f}"
        bar.set_postfix(postfix)
    if scheduler is not None:  # a caller's optimizer leaves at the rates it came with
        for group, lr in zip(opt.param_groups, start_lrs, strict=True):
            group["lr"] = lr
            group.pop("initial_lr", None)
    model.eval()
    return history


@torch.no_grad()
def has_batchnorm(model: nn.Module) -> bool:
    """Whether `model` has a BatchNorm that tracks running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


def recalibrate_bn_(model: nn.Module, loader: Iterable, batches: int = 20) -> int:
    """Re-estimate every BatchNorm's running mean and variance on `batches` batches.

    Removing channels or quantizing shifts what each BatchNorm sees, and its stored
    statistics no longer fit: a pruned ResNet can fall to chance until they are measured
    again (adaptive BN, as in EagleEye, Li et al. 2020). Weights do not change; the
    statistics become the plain average over the batches. Returns how many BatchNorm
    layers were recalibrated (0 leaves the model untouched).
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive int, got {batches!r}")
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    model.train()
    seen = 0
    try:
        for batch in loader:
            if seen == batches:
                break
            model(batch[0] if isinstance(batch, list | tuple) else batch)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("cannot recalibrate BatchNorm on an empty loader; give it a batch")
    return len(norms)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, shard: bool = True) -> float:
    """Top-1 accuracy of `model` over `loader`, as a fraction in [0, 1]. A batch is
    (inputs, labels), the inputs a tensor, tuple or dict of keyword tensors, or a dict of
    keyword tensors with a "labels" entry; the first tensor the model returns is scored
    (a Hugging Face ModelOutput's `logits`).

    Under torchrun every rank must call it: each counts its share of `loader` and the
    counts are summed, so all ranks get the accuracy over the whole loader. `shard=False`
    evaluates the whole loader on this rank alone, for ranks holding different models.
    """
    spread = shard and distributed.init()
    if spread:
        loader = distributed.shard(loader, even=False)
    correct = seen = 0
    with eval_mode(model):
        for batch in loader:
            x, y = inputs.labelled(batch)
            logits = inputs.first_tensor(inputs.call(model, x))
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
    if spread:
        correct, seen = (int(distributed.all_reduce(v, "sum")) for v in (correct, seen))
    if seen == 0:
        raise ValueError("cannot evaluate on an empty loader; give it at least one batch")
    return correct / seen
