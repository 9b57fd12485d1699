"""Pruning: masks that fine-tuning keeps, magnitude criteria, schedules, structured masks
(N:M, shapes, kernels, stripes, vectors, blocks), and structured pruning that physically
removes channels (dependency graph, groups, surgery) and attention heads."""

from __future__ import annotations

from penjing.core.parametrize import (
    PRUNABLE,
    Mask,
    finalize_,
    get_mask,
    masks,
    select_layers,
    set_mask_,
)
from penjing.errors import renamed
from penjing.prune.compact import ShapeConv2d, StripeConv2d, compact_
from penjing.prune.configs import (
    STRUCTURES,
    ChannelConfig,
    HeadConfig,
    MagnitudeConfig,
    NMConfig,
    PatternConfig,
    prune_,
)
from penjing.prune.criteria import CRITERIA, taylor
from penjing.prune.explain import explain
from penjing.prune.graph import DependencyGraph, dependency_graph
from penjing.prune.groups import Group, Slice
from penjing.prune.heads import HeadAttention, heads_
from penjing.prune.hf_heads import count_hf_macs, hf_ffn_, hf_heads_, load_pretrained
from penjing.prune.magnitude import check_sparsity, magnitude_
from penjing.prune.nm import is_nm, nm_, nm_mask
from penjing.prune.ops import KINDS, register_op
from penjing.prune.patterns import (
    PATTERNS,
    Block,
    Kernel,
    Shape,
    Stripe,
    group_lasso,
    group_lasso_loss,
    is_pattern,
    pattern_,
    pattern_mask,
)
from penjing.prune.schedule import agp, iterative
from penjing.prune.slimming import bn_l1, slim, slimming_loss
from penjing.prune.structured import CHANNEL_STRUCTURES, channels, channels_, groups, ratio_for_macs
from penjing.prune.surgery import Change, apply_, load_pruned, save_pruned
from penjing.prune.swp import FilterSkeleton, skeleton_, skeleton_l1, skeleton_loss, stripes_

__all__ = [
    "STRUCTURES",
    "ChannelConfig",
    "HeadConfig",
    "MagnitudeConfig",
    "NMConfig",
    "PatternConfig",
    "prune_",
    "CRITERIA",
    "KINDS",
    "CHANNEL_STRUCTURES",
    "PATTERNS",
    "PRUNABLE",
    "Block",
    "Change",
    "DependencyGraph",
    "FilterSkeleton",
    "Group",
    "HeadAttention",
    "Kernel",
    "Mask",
    "Shape",
    "ShapeConv2d",
    "Slice",
    "Stripe",
    "StripeConv2d",
    "agp",
    "apply_",
    "bn_l1",
    "channels",
    "channels_",
    "check_sparsity",
    "compact_",
    "count_hf_macs",
    "dependency_graph",
    "explain",
    "finalize_",
    "get_mask",
    "group_lasso",
    "group_lasso_loss",
    "groups",
    "heads_",
    "hf_ffn_",
    "hf_heads_",
    "load_pretrained",
    "is_nm",
    "is_pattern",
    "iterative",
    "load_pruned",
    "magnitude_",
    "masks",
    "nm_",
    "nm_mask",
    "pattern_",
    "pattern_mask",
    "ratio_for_macs",
    "register_op",
    "save_pruned",
    "select_layers",
    "set_mask_",
    "skeleton_",
    "skeleton_l1",
    "skeleton_loss",
    "slim",
    "slimming_loss",
    "stripes_",
    "taylor",
]

# names of earlier releases, answered with a DeprecationWarning
__getattr__ = renamed(__name__, {"GRANULARITIES": "CHANNEL_STRUCTURES"})
