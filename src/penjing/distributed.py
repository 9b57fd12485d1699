"""Several processes, one training run: what penjing does when launched by `torchrun`.

`torchrun --nproc_per_node N script.py` starts N copies of a script with RANK, WORLD_SIZE
and LOCAL_RANK in their environment. `penjing.train.fit` (and so distillation and QAT,
which train through it) notices, joins the process group, gives each rank its share of
every epoch, averages gradients over ranks after each backward pass, and leaves every
rank with the same weights and buffers. In one process nothing here runs.

Gradients are averaged by `all_reduce_grads_` rather than by wrapping the model in
DistributedDataParallel: the arithmetic is DDP's (the mean of every rank's gradient), but
the model stays the caller's own module, so a loss function that selects layers by name
(group lasso, a filter skeleton's L1) sees the names it knows, and a parameter that gets
no gradient (a weight replaced by its shared centroids) needs no unused-parameter search.

>>> import penjing as pj
>>> pj.distributed.init()            # no-op outside torchrun; else gloo (CPU) / nccl (GPU)
>>> pj.train.fit(model, train_loader, epochs=3)   # each rank trains on 1/N of the data
>>> pj.distributed.main_only(pj.train.save_checkpoint)(model, "model.safetensors")
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

ENV = ("RANK", "WORLD_SIZE")  # what torchrun (torch.distributed.run) sets for each worker


def launched() -> bool:
    """Whether this process was started by torchrun (RANK and WORLD_SIZE are set)."""
    return all(key in os.environ for key in ENV)


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether a process group of more than one rank is up (collectives are needed)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def default_backend() -> str:
    """gloo for CPU tensors, plus nccl for CUDA tensors when NCCL is built in and every
    rank on this machine has a GPU of its own (NCCL refuses two ranks on one GPU)."""
    dist = _dist()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if (torch.cuda.is_available() and dist.is_nccl_available()
            and torch.cuda.device_count() >= local_ranks):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init(backend: str | None = None) -> bool:
    """Join torchrun's process group once; return whether training is distributed.

    Outside torchrun this does nothing and returns False, so a script runs unchanged in
    one process. Under torchrun the group is created from the environment (env://) with
    `backend` (default: `default_backend()`); a second call returns at once. With nccl,
    the process uses GPU LOCAL_RANK.
    """
    if not launched():
        return False
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError(
            "launched by torchrun, but this PyTorch build has no torch.distributed; install "
            "a PyTorch with distributed support, or run without torchrun"
        )
    if dist.is_initialized():
        return dist.get_world_size() > 1
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        value = os.environ.get(key, "0")
        if not value.isdigit():
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}; launch "
                             "with `torchrun --nproc_per_node N ...`")
    backend = backend or default_backend()
    for name in (part.split(":")[-1] for part in backend.split(",")):
        if not dist.is_backend_available(name):
            raise RuntimeError(
                f"launched by torchrun with the {name!r} backend, which this PyTorch build "
                f"lacks; pass init(backend='gloo') (CPU) or install a PyTorch with {name}"
            )
    if "nccl" in backend and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend)
    global _joined, _hooked
    _joined = True
    if not _hooked:
        atexit.register(_at_exit)
        _hooked = True
    return dist.get_world_size() > 1


_joined = False  # this process joined a group through init() and has not left it yet
_hooked = False  # _at_exit is registered (once per process)
LEAVE_TIMEOUT = 60.0  # seconds every rank waits for the others at the end of a run


def shutdown(*, wait: bool = True, timeout: float = LEAVE_TIMEOUT) -> bool:
    """Leave the process group that `init` joined; return whether this call left it.

    A rank that tears down its connections while a peer is still using them can take the
    peer down with it (an abort in the peer's communication threads), so by default
    every rank first waits for the others (at most `timeout` seconds), then each destroys
    the group, and rank 0, which hosts the rendezvous store, leaves last, once every
    other rank has said it is gone. `wait=False` skips the waiting: a rank that stops on
    an error must not wait for peers that may be waiting for it. Outside torchrun, and on
    a second call, nothing happens. `init` registers this to run at exit, so a script
    needs no call of its own; the `penjing` command calls it when a verb ends.
    """
    global _joined
    if not _joined:
        return False
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):  # the caller destroyed it
        _joined = False
        return False
    world, me = dist.get_world_size(), dist.get_rank()
    store = None
    if wait and world > 1:  # interrupted here, the group stays joined for a later call
        store = _store(dist)
        _barrier(dist, timeout)
    _joined = False
    dist.destroy_process_group()
    if store is not None:
        _leave_in_order(store, me, world, timeout)
    return True


def _store(dist):
    """The rendezvous store, kept past the group so that ranks can say they are gone."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, ValueError, RuntimeError):
        return None


def _barrier(dist, timeout: float) -> None:
    """Every rank here, or `timeout` seconds passed, or a peer already gone: go on."""
    import datetime

    try:
        if "gloo" in str(dist.get_backend()):
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout))
        else:
            dist.barrier()
    except (RuntimeError, ValueError):  # a peer that left or timed out: leave all the same
        pass


def _leave_in_order(store, me: int, world: int, timeout: float) -> None:
    """Ranks other than 0 say they left; rank 0 waits for them before its store goes."""
    import datetime

    try:
        if me != 0:
            store.set(f"penjing/left/{me}", "1")
        else:
            store.wait([f"penjing/left/{r}" for r in range(1, world)],
                       datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError):  # a peer that never said so: rank 0 leaves anyway
        pass


def _at_exit() -> None:
    """At interpreter exit: leave the group, waiting for the peers unless the process is
    ending on an uncaught exception (Python has set sys.last_value by then)."""
    import sys

    failed = getattr(sys, "last_value", None) is not None
    shutdown(wait=not failed)


def rank() -> int:
    """This process's rank (0 in one process)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many processes train together (1 in one process)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0: the one process that prints, shows progress and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if active():
        _dist().barrier()


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """`fn` run on rank 0 only (None elsewhere), then a barrier, so that a file it writes
    exists for every rank afterwards and only one process ever writes it.

    >>> main_only(pj.train.save_checkpoint)(model, "model.safetensors")
    """

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> T | None:
        result = fn(*args, **kwargs) if is_main() else None
        barrier()
        return result

    return guarded


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@torch.no_grad()
def broadcast_(tensors: nn.Module | Iterable[torch.Tensor], src: int = 0) -> int:
    """Copy every parameter and buffer of a module (or the given tensors) from rank `src`
    to all ranks, in place; return how many tensors were sent (0 in one process)."""
    if not active():
        return 0
    dist = _dist()
    items = list(_tensors(tensors) if isinstance(tensors, nn.Module) else tensors)
    for t in items:
        dist.broadcast(t.data, src)
    return len(items)


def broadcast_buffers_(module: nn.Module, src: int = 0) -> int:
    """Copy every buffer (BatchNorm statistics, masks, quantizer scales) from rank `src`,
    as DDP does before each forward: ranks that saw other batches agree again."""
    return broadcast_(module.buffers(), src)


def all_reduce(value: float | torch.Tensor, op: str = "mean") -> float | torch.Tensor:
    """`value` combined over all ranks by `op` ("mean", "sum", "min" or "max"); a float
    gives a float back, a tensor a new tensor. In one process: `value` itself."""
    ops = ("mean", "sum", "min", "max")
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r}; choose one of {ops}")
    if not active():
        return value
    dist = _dist()
    t = value.detach().clone() if isinstance(value, torch.Tensor) else (
        torch.tensor(float(value), dtype=torch.float64))
    reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM,
                 "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(t, reduce_op)
    if op == "mean":
        t = t / dist.get_world_size()
    return t if isinstance(value, torch.Tensor) else float(t)


@torch.no_grad()
def all_reduce_grads_(params: Iterable[torch.Tensor]) -> int:
    """Replace each parameter's gradient by its mean over all ranks; return how many
    parameters have one afterwards.

    One flat all-reduce per device and dtype. A parameter that got no gradient on any
    rank keeps `grad = None` (an optimizer then skips it, as in one process); one that
    got a gradient on some ranks only gets the mean with zeros for the others.
    """
    params = [p for p in params if p.requires_grad]
    if not active():
        return sum(p.grad is not None for p in params)
    dist = _dist()
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    kept = 0
    for (device, dtype), group in groups.items():
        # the last len(group) entries count the ranks that had a gradient for each parameter
        flat = torch.cat([
            *(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype,
                                                                          device=device)
              for p in group),
            torch.tensor([float(p.grad is not None) for p in group], dtype=dtype, device=device),
        ])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p, had in zip(group, flat[-len(group):].tolist(), strict=True):
            chunk = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if had == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            kept += had != 0
    return kept


class _EveryNth:
    """Batches rank, rank + N, rank + 2N, ... of a loader that cannot be re-sampled.

    `even=True` keeps whole rounds of N batches only, so every rank takes the same number
    of steps (a rank with one step more would wait for the others' gradients forever).
    """

    def __init__(self, loader: Iterable, rank: int, world: int, even: bool) -> None:
        self.loader, self.rank, self.world, self.even = loader, rank, world, even

    def __iter__(self) -> Iterator:
        if not self.even:
            yield from itertools.islice(self.loader, self.rank, None, self.world)
            return
        mine = None
        for i, batch in enumerate(self.loader):
            if i % self.world == self.rank:
                mine = batch
            if i % self.world == self.world - 1:
                yield mine

    def __len__(self) -> int:
        n = len(self.loader)  # type: ignore[arg-type]
        return n // self.world if self.even else len(range(self.rank, n, self.world))


def shard(loader: Iterable, *, even: bool = True, seed: int = 0) -> Iterable:
    """This rank's share of `loader`; `loader` itself in one process or if already sharded.

    A DataLoader over a map-style dataset is rebuilt around a DistributedSampler: the same
    batch size per rank (the global batch is N times larger), shuffled if the loader
    was, by `seed` and the epoch (call `set_epoch` each epoch). `even=True` (training):
    every rank gets the same number of batches, the sampler repeating a few samples to
    fill the last round. `even=False` (evaluation): an exact partition, each sample seen
    once. Any other iterable (an IterableDataset, a custom batch sampler, a generator)
    is read whole by every rank, which keeps every N-th batch.
    """
    from torch.utils.data import (
        DataLoader,
        DistributedSampler,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
    )

    if not active():
        return loader
    r, world = rank(), world_size()
    if not isinstance(loader, DataLoader):
        return _EveryNth(loader, r, world, even)
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if (isinstance(loader.dataset, IterableDataset) or loader.batch_size is None
            or not isinstance(loader.sampler, RandomSampler | SequentialSampler)):
        return _EveryNth(loader, r, world, even)
    shuffle = isinstance(loader.sampler, RandomSampler)
    if even:
        sampler = DistributedSampler(loader.dataset, world, r, shuffle=shuffle, seed=seed)
    else:  # each index once: ranks may differ by one sample
        order = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(
            seed)).tolist() if shuffle else range(len(loader.dataset))
        sampler = list(order[r::world])
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers, **extra,
    )


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Tell a loader's DistributedSampler the epoch, so each epoch is shuffled anew (and
    the same way on every rank)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
