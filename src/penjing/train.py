"""Train and evaluate loops: seeded, deterministic on CPU, with a progress bar."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from penjing import inputs
from penjing.io import atomic_write_bytes

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


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put `models` in eval mode for the block, then back in the mode each came in with."""
    modes = [(model, model.training) for model in models]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, mode in modes:
            model.train(mode)


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

    from penjing import distributed

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
    from penjing import distributed

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


INTEGRITY_KEY = "penjing.sha256"  # metadata entry: SHA-256 of every tensor and metadata entry


def checkpoint_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata entry but
    the digest itself: what `save_checkpoint` stores under INTEGRITY_KEY."""
    import hashlib
    import json

    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    rest = sorted((k, v) for k, v in metadata.items() if k != INTEGRITY_KEY)
    h.update(json.dumps(rest).encode())
    return h.hexdigest()


def save_checkpoint(
    model: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> int:
    """Save a model's state_dict (and string `metadata`) as safetensors, atomically, with
    a SHA-256 of the tensors and metadata; return the bytes written."""
    from safetensors.torch import save

    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    metadata = dict(metadata or {})
    metadata[INTEGRITY_KEY] = checkpoint_digest(tensors, metadata)
    data = save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    return len(data)


def read_checkpoint(
    path: str | os.PathLike, what: str = "checkpoint",
    writer: str = "penjing.train.save_checkpoint",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of the safetensors file at `path`, read once and
    never unpickled. A missing file is FileNotFoundError, a folder IsADirectoryError, and
    an unreadable or damaged one FormatError, naming `what` the file should be and the
    `writer` that makes one. The SHA-256 penjing stores is checked when present (files
    written before it existed, or by other tools, have none)."""
    import errno

    from safetensors import SafetensorError, safe_open

    from penjing.errors import FormatError

    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{what} {str(path)!r} is a folder; give the "
                                "safetensors file inside it")
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError,
            MemoryError) as err:
        raise FormatError(
            f"cannot read {what} {str(path)!r} as safetensors ({err}); penjing writes one "
            f"with {writer}"
        ) from err
    stored = metadata.get(INTEGRITY_KEY)
    if stored is not None and stored != checkpoint_digest(tensors, metadata):
        raise FormatError(
            f"{what} {str(path)!r} is corrupt: its tensors or metadata do not match their "
            f"SHA-256; write it again with {writer}"
        )
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None):
    """Load a safetensors checkpoint (never pickle); fill `model` if given, else return the dict."""
    state, _ = read_checkpoint(path)
    return load_state(model, state, path) if model is not None else state


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps `state` from loading into `model`, in one line ('' if it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} is {'x'.join(map(str, state[k].shape)) or '()'} in the file but "
        f"{'x'.join(map(str, own[k].shape)) or '()'} here"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    parts = [
        f"{len(v)} {label} ({few(v)})"
        for label, v in (("missing", missing), ("unexpected", unexpected),
                         ("of another shape", shapes))
        if v
    ]
    return "; ".join(parts)


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
) -> nn.Module:
    """`model` with `state` (read from `path`) loaded, or a FormatError naming in one line
    what does not fit; the model is checked first and left unchanged on failure."""
    from penjing.errors import FormatError

    problem = _mismatch(model, state)
    if not problem:
        try:
            model.load_state_dict(state)
            return model
        except RuntimeError as err:  # a dtype copy can still fail (complex into float)
            problem = str(err).strip().splitlines()[-1][:300]
    raise FormatError(
        f"the weights in {str(path)!r} do not fit {type(model).__name__}: tensors {problem}; "
        "give the checkpoint of this architecture (a pruned model: finalize_ it first)"
    )
