"""Stripe-wise pruning (SWP, Meng et al., "Pruning Filter in Filter", NeurIPS'20).

Each filter of a k×k conv is k·k stripes of shape 1×1×C. A *filter skeleton* I of shape
(out, 1, kh, kw), initialised to 1, multiplies the weight in forward (W ⊙ I), so every
stripe has a learnable scale; training with α·Σ|I| added to the loss drives the scales of
unneeded stripes to zero. Then the skeleton is folded into the weights, the stripes whose
|I| fell below a threshold (or the lowest `sparsity` of them) are masked, and
`penjing.prune.compact_` re-expresses each conv to compute only the kept stripes.

    pj.prune.skeleton_(model)
    pj.train.fit(model, train, epochs=3, loss_fn=pj.prune.skeleton_loss(alpha=1e-4))
    pj.prune.stripes_(model, sparsity=0.5)      # or threshold=0.05, the paper's way
    pj.train.fit(model, train, epochs=2)         # fine-tune; masks keep stripes at zero
    pj.finalize_(model); pj.prune.compact_(model)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from penjing.core.parametrize import get_mask, own_class_, set_mask_
from penjing.errors import UnsupportedLayerError
from penjing.prune.masking.magnitude import check_sparsity
from penjing.prune.masking.patterns import Stripe, pattern_mask
from penjing.train import LossFn, cross_entropy, with_penalty


class FilterSkeleton(nn.Module):
    """Parametrization `weight -> weight * skeleton`, one learnable scale per stripe."""

    def __init__(self, out_channels: int, kernel_size: tuple[int, ...]) -> None:
        super().__init__()
        self.skeleton = nn.Parameter(torch.ones(out_channels, 1, *kernel_size))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.skeleton


def _stripe_convs(model: nn.Module, layers: list[str] | None) -> dict[str, nn.Conv2d]:
    modules = dict(model.named_modules())
    fits = {n: m for n, m in modules.items()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.shape[2:].numel() > 1}
    if layers is None:
        if not fits:
            raise UnsupportedLayerError(f"{type(model).__name__} has no Conv2d with a kernel "
                                        "larger than 1×1 and groups=1, so no stripes to prune")
        return fits
    for name in layers:
        if name not in modules:
            raise ValueError(f"no layer named {name!r} in the model; stripe layers: "
                             f"{sorted(fits)}")
        if name not in fits:
            raise UnsupportedLayerError(
                f"layer {name!r} is a {type(modules[name]).__name__} "
                f"(kernel {getattr(modules[name], 'kernel_size', '-')}); stripes need a Conv2d "
                "with groups=1 and a kernel larger than 1×1"
            )
    return {n: fits[n] for n in layers}


def get_skeleton(module: nn.Module) -> FilterSkeleton | None:
    """The filter skeleton on `module.weight`, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, FilterSkeleton)),
                None)


def skeleton_(model: nn.Module, layers: list[str] | None = None) -> list[str]:
    """Give every chosen Conv2d (default: all with groups=1 and kernel > 1×1) a filter
    skeleton of ones, in place; the model computes the same until it trains. Returns names."""
    done = []
    for name, conv in _stripe_convs(model, layers).items():
        if get_skeleton(conv) is None:
            parametrize.register_parametrization(
                conv, "weight", FilterSkeleton(conv.out_channels, tuple(conv.kernel_size)))
        done.append(name)
    return done


def skeletons(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every filter skeleton in `model` (out, 1, kh, kw), by layer name."""
    return {name: s.skeleton for name, m in model.named_modules()
            if (s := get_skeleton(m)) is not None}


def skeleton_l1(model: nn.Module, alpha: float) -> torch.Tensor:
    """α·Σ|I| over every filter skeleton in `model` (add it to a training loss)."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    found = list(skeletons(model).values())
    if not found:
        raise ValueError(f"{type(model).__name__} has no filter skeleton; call "
                         "penjing.prune.skeleton_(model) before training with this penalty")
    return alpha * sum(s.abs().sum() for s in found)


def skeleton_loss(alpha: float = 1e-4, base: LossFn = cross_entropy) -> LossFn:
    """`base` loss plus α·Σ|I|, as a `loss_fn(model, x, y)` for `penjing.train.fit`."""
    return with_penalty(lambda model: skeleton_l1(model, alpha), base)


def stripes_(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    threshold: float | None = None,
    layers: list[str] | None = None,
) -> dict[str, float]:
    """Fold each filter skeleton into its weights and mask pruned stripes, in place.

    Give exactly one of `sparsity` (the fraction of stripes to zero in every layer: the
    lowest |I| where a skeleton was trained, else the lowest stripe RMS) or `threshold`
    (zero the stripes whose |I| < threshold; needs a skeleton). The folded weight computes
    exactly what W ⊙ I did. Returns each layer's fraction of zeroed stripes.
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity= or threshold=")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    elif isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    chosen = _stripe_convs(model, layers if layers is not None else
                           (list(skeletons(model)) or None))
    done = {}
    for name, conv in chosen.items():
        skeleton = get_skeleton(conv)
        scale = None if skeleton is None else skeleton.skeleton.detach().abs().clone()
        if scale is None and threshold is not None:
            raise ValueError(f"layer {name!r} has no filter skeleton to compare with "
                             "threshold=; train one (skeleton_) or give sparsity=")
        old = get_mask(conv)
        old = None if old is None else old.clone()
        if parametrize.is_parametrized(conv, "weight"):  # fold I (and any mask) into W
            parametrize.remove_parametrizations(own_class_(conv), "weight", leave_parametrized=True)
        weight = conv.weight.detach()
        if scale is None:
            mask = pattern_mask(weight, Stripe(), sparsity)
        else:
            per_stripe = scale.reshape(-1)
            keep = torch.ones_like(per_stripe)
            if threshold is not None:
                keep[per_stripe < threshold] = 0
            else:
                drop = round(sparsity * per_stripe.numel())
                keep[torch.argsort(per_stripe, stable=True)[:drop]] = 0
            mask = keep.view_as(scale).expand_as(weight).contiguous()
        set_mask_(conv, mask if old is None else mask * old)
        done[name] = 1.0 - float(mask.reshape(mask.shape[0], mask.shape[1], -1)[:, 0].mean())
    return done
