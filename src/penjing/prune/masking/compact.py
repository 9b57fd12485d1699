"""Re-express convs with zeroed stripes or shapes so that the saving is real on a dense runtime.

A 3×3 conv is the sum over its 9 kernel positions of a 1×1 conv applied to the input
shifted to that position. Stripe-wise pruning (SWP) removes, per filter, some positions:
`StripeConv2d` runs one 1×1 conv holding only the kept stripes and adds each stripe's
output, shifted, into the filters that own it (Meng et al., NeurIPS'20). Shape-wise pruning
removes, per position, some input channels from every filter: `ShapeConv2d` gathers only
the kept (channel, position) columns of the input and runs one 1×1 conv over them — im2col
without the removed columns. Both compute exactly what the masked conv computes, up to
float rounding (the sum runs in another order).

Do this last: the dependency graph cannot see through these layers (channel pruning first),
and a masked model saves and loads as usual, so save it before compacting and compact after
loading.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from penjing.core import history
from penjing.core.parametrize import own_class_
from penjing.core.steps import Step
from penjing.errors import UnsupportedLayerError


def _positions(kernel: tuple[int, int]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]


class _Shifted(nn.Module):
    """Geometry shared by both layers: padding, stride, dilation of the conv replaced."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        padding = conv.padding
        if isinstance(padding, str):  # "valid" is 0; "same" is resolved by the conv itself
            if padding != "valid":
                raise UnsupportedLayerError("compact_ needs numeric padding, got 'same'")
            padding = (0, 0)
        self.padding = tuple(padding)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def _geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        ph, pw = self.padding
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (xp.shape[-2] - dh * (kh - 1) - 1) // sh + 1
        wo = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
        return xp, ho, wo

    def _window(self, xp: torch.Tensor, pos: tuple[int, int], ho: int, wo: int) -> torch.Tensor:
        (i, j), (sh, sw), (dh, dw) = pos, self.stride, self.dilation
        return xp[..., i * dh: i * dh + sh * (ho - 1) + 1: sh,
                  j * dw: j * dw + sw * (wo - 1) + 1: sw]


class StripeConv2d(_Shifted):
    """A conv whose filters keep only some of their kh·kw stripes (1×1×C each)."""

    def __init__(self, conv: nn.Conv2d, kept: torch.Tensor) -> None:
        """`kept`: bool (out, kh, kw), the stripes to keep."""
        super().__init__(conv)
        weight = conv.weight.detach()
        rows, pieces = [], []
        for i, j in _positions(self.kernel_size):
            filters = torch.nonzero(kept[:, i, j]).flatten()
            rows.append(filters)
            pieces.append(weight[filters, :, i, j])
        self.counts = [len(r) for r in rows]
        self.register_buffer("rows", torch.cat(rows))
        # one (stripes, C, 1, 1) weight: a single GEMM computes every kept stripe at once
        self.weight = nn.Parameter(torch.cat(pieces)[:, :, None, None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, ho, wo = self._geometry(x)
        out = x.new_zeros(x.shape[0], self.out_channels, ho, wo)
        positions = _positions(self.kernel_size)
        if self.stride == (1, 1):
            z = F.conv2d(xp, self.weight)
            start = 0
            for pos, n in zip(positions, self.counts, strict=True):
                if n:
                    piece = self._window(z[:, start:start + n], pos, ho, wo)
                    out.index_add_(1, self.rows[start:start + n], piece)
                start += n
        else:  # strided: shift first so no output is computed only to be dropped
            start = 0
            for pos, n in zip(positions, self.counts, strict=True):
                if n:
                    piece = F.conv2d(self._window(xp, pos, ho, wo),
                                     self.weight[start:start + n])
                    out.index_add_(1, self.rows[start:start + n], piece)
                start += n
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def macs(self, args: tuple, output: torch.Tensor) -> int:
        """Multiply-accumulates of one forward that produced `output` (what really runs)."""
        n, _, ho, wo = output.shape
        if self.stride == (1, 1):  # the 1×1 conv runs over the padded input
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            ho, wo = ho + dh * (kh - 1), wo + dw * (kw - 1)
        return n * ho * wo * self.weight.shape[0] * self.weight.shape[1]

    def extra_repr(self) -> str:
        total = self.out_channels * math.prod(self.kernel_size)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, stripes={self.weight.shape[0]}/{total}")


class ShapeConv2d(_Shifted):
    """A conv whose filters all drop the same (channel, kh, kw) positions: pruned im2col."""

    def __init__(self, conv: nn.Conv2d, kept: torch.Tensor) -> None:
        """`kept`: bool (in, kh, kw), the columns to keep."""
        super().__init__(conv)
        weight = conv.weight.detach()
        cols, pieces = [], []
        for i, j in _positions(self.kernel_size):
            channels = torch.nonzero(kept[:, i, j]).flatten()
            cols.append(channels)
            pieces.append(weight[:, channels, i, j])
        self.counts = [len(c) for c in cols]
        self.full = [n == self.in_channels for n in self.counts]  # no gather needed there
        self.register_buffer("cols", torch.cat(cols))
        self.weight = nn.Parameter(torch.cat(pieces, dim=1)[:, :, None, None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, ho, wo = self._geometry(x)
        pieces, start = [], 0
        for pos, n, full in zip(_positions(self.kernel_size), self.counts, self.full,
                                strict=True):
            if n:
                window = self._window(xp, pos, ho, wo)
                pieces.append(window if full else
                              window.index_select(1, self.cols[start:start + n]))
            start += n
        return F.conv2d(torch.cat(pieces, dim=1), self.weight, self.bias)

    def macs(self, args: tuple, output: torch.Tensor) -> int:
        """Multiply-accumulates of one forward that produced `output`."""
        return output.numel() * self.weight.shape[1]

    def extra_repr(self) -> str:
        total = self.in_channels * math.prod(self.kernel_size)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, columns={self.weight.shape[1]}/{total}")


def _compactable(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and module.padding != "same"
            and math.prod(module.kernel_size) > 1)


def compact_(
    model: nn.Module, layers: list[str] | None = None, min_saving: float = 0.1
) -> dict[str, str]:
    """Replace every Conv2d whose zeros come as whole stripes or shape columns, in place.

    For each conv the cheaper form wins: StripeConv2d (keeps stripes with any non-zero) or
    ShapeConv2d (keeps columns with any non-zero); a conv is left alone when neither cuts
    its weights by `min_saving`. Masks are baked in first. Returns {layer: "stripe" |
    "shape"} for the layers replaced. Grouped, 1×1 and non-zero-padded convs are left alone
    (channel pruning handles 1×1 convs for real already).
    """
    if not 0 <= min_saving < 1:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving!r}")
    modules = dict(model.named_modules())
    if layers is not None:
        for name in layers:
            if name not in modules or not _compactable(modules[name]):
                raise UnsupportedLayerError(
                    f"layer {name!r} is not a Conv2d with groups=1, zero padding and a kernel "
                    "larger than 1×1, so it cannot be compacted; leave it out of layers="
                )
    names = layers if layers is not None else [n for n, m in modules.items() if n and
                                                _compactable(m)]
    done = {}
    for name in names:
        conv = modules[name]
        if parametrize.is_parametrized(conv, "weight"):
            parametrize.remove_parametrizations(own_class_(conv), "weight", leave_parametrized=True)
        nonzero = conv.weight.detach() != 0
        stripes = nonzero.any(dim=1)  # (out, kh, kw)
        columns = nonzero.any(dim=0)  # (in, kh, kw)
        stripe_share = float(stripes.float().mean())
        shape_share = float(columns.float().mean())
        if min(stripe_share, shape_share) > 1 - min_saving:
            continue
        if stripe_share <= shape_share:
            new, done[name] = StripeConv2d(conv, stripes), "stripe"
        else:
            new, done[name] = ShapeConv2d(conv, columns), "shape"
        new.train(conv.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.to(conv.weight.device))
    if done:
        history.record(model, {"op": "compact", "layers": {
            name: [kind, _kept_lists(model.get_submodule(name))] for name, kind in done.items()
        }})
    return done


def _kept_lists(layer: StripeConv2d | ShapeConv2d) -> list[list[int]]:
    """The filters (stripe) or input channels (shape) kept at each kernel position."""
    index = (layer.rows if isinstance(layer, StripeConv2d) else layer.cols).tolist()
    starts = [0, *itertools.accumulate(layer.counts)]
    return [index[a:b] for a, b in itertools.pairwise(starts)]


def replay_compact_(model: nn.Module, layers: dict[str, list]) -> None:
    """Replace convs as `compact_` did, from the {layer: [kind, kept lists]} it recorded
    (weights are loaded afterwards). A ValueError when the record does not fit."""
    for name, (kind, kept) in layers.items():
        conv = model.get_submodule(name)
        if not _compactable(conv) or kind not in ("stripe", "shape"):
            raise ValueError(f"layer {name!r} ({type(conv).__name__}) cannot be a {kind} conv")
        size = conv.out_channels if kind == "stripe" else conv.in_channels
        positions = _positions(tuple(conv.kernel_size))
        if len(kept) != len(positions):
            raise ValueError(f"layer {name!r}: {len(kept)} kernel positions recorded, the conv "
                             f"has {len(positions)}")
        mask = torch.zeros(size, *conv.kernel_size, dtype=torch.bool)
        for (i, j), rows in zip(positions, kept, strict=True):
            if rows and (min(rows) < 0 or max(rows) >= size):
                raise ValueError(f"layer {name!r}: kept index out of 0..{size - 1}")
            mask[rows, i, j] = True
        new = (StripeConv2d if kind == "stripe" else ShapeConv2d)(conv, mask)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


STEP = Step(
    "compact", history.replaying(lambda m, step: replay_compact_(m, dict(step["layers"]))),
    structural=True,
    help="convs with pruned stripes or shapes rebuilt smaller (penjing.prune.compact_)",
)
