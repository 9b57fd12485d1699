"""Size and cost of a model: parameter count, multiply-accumulates, eager latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def _as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of conv and linear layers in one forward pass on `example_inputs`.

    Counted from the real output shapes (hooks), so pruned, grouped and depthwise layers are
    counted as they run; pass a batch of one for per-image MACs.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.weight[0].numel()  # (in / groups) · kernel size
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*_as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def latency(model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 30) -> float:
    """Median seconds of one eager forward pass on `example_inputs` (eval mode, no grad)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    inputs = _as_tuple(example_inputs)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(*inputs)
            for _ in range(repeats):
                start = time.perf_counter()
                model(*inputs)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)
