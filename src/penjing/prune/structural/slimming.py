"""Network slimming (Liu et al., ICCV'17): train with λ·Σ|γ| on BatchNorm scales, then cut
the channels whose γ went to zero, then fine-tune.

    loss_fn = pj.prune.slimming_loss(1e-4)            # any loop that takes loss_fn
    pj.train.fit(model, loader, epochs=5, loss_fn=loss_fn)
    small = pj.prune.slim(model, example_inputs=x, ratio=0.5)
    pj.train.fit(small, loader, epochs=3)             # fine-tune
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from penjing.prune.structural.structured import channels
from penjing.train import LossFn, cross_entropy, with_penalty


def bn_l1(model: nn.Module, lam: float) -> torch.Tensor:
    """λ·Σ|γ| over every BatchNorm scale in `model` (add it to a training loss)."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    gammas = [m.weight for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not gammas:
        raise ValueError(f"{type(model).__name__} has no affine BatchNorm layer; network "
                         "slimming needs BatchNorm scales to push towards zero")
    return lam * sum(g.abs().sum() for g in gammas)


def slimming_loss(lam: float = 1e-4, base: LossFn = cross_entropy) -> LossFn:
    """`base` loss plus λ·Σ|γ|, as a `loss_fn(model, x, y)` for `penjing.train.fit`."""
    return with_penalty(lambda model: bn_l1(model, lam), base)


def slim(model: nn.Module, example_inputs: Any, ratio: float = 0.5, **kwargs) -> nn.Module:
    """A copy of `model` without the `ratio` of BN channels with the smallest |γ|, ranked
    across the whole network with raw γ as the paper does."""
    kwargs.setdefault("global_ranking", True)
    kwargs.setdefault("normalize", False)
    return channels(model, example_inputs, ratio=ratio, criterion="bn", **kwargs)
