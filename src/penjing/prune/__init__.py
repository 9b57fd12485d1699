"""Pruning: one entry, `prune_(model, config)`, whose config says what goes (single
weights, N:M, a pattern, channels, heads); the methods it runs, callable on their own;
schedules, criteria, penalties for training towards sparsity, and the dependency graph
that channel pruning removes coupled channels with.

What a user calls is in `__all__`; the building blocks (masks, groups, the graph's types,
the compacted conv modules) are importable from their modules.
"""

from __future__ import annotations

from penjing.core.parametrize import finalize_, get_mask, masks, set_mask_
from penjing.errors import renamed
from penjing.prune.configs import (
    STRUCTURES,
    ChannelConfig,
    HeadConfig,
    MagnitudeConfig,
    NMConfig,
    PatternConfig,
    prune_,
)
from penjing.prune.heads import HeadAttention, heads_
from penjing.prune.hf_heads import count_hf_macs, hf_ffn_, hf_heads_, load_pretrained
from penjing.prune.masking.compact import compact_
from penjing.prune.masking.layerwise import SparseGPTConfig, WandaConfig, sparsegpt_, wanda_
from penjing.prune.masking.magnitude import magnitude_
from penjing.prune.masking.nm import is_nm, nm_
from penjing.prune.masking.patterns import (
    Block,
    Kernel,
    Shape,
    Stripe,
    group_lasso_loss,
    is_pattern,
    pattern_,
)
from penjing.prune.masking.swp import skeleton_, skeleton_loss, stripes_
from penjing.prune.schedule import agp, cuts, iterative, prune_rounds_
from penjing.prune.structural.criteria import CRITERIA, taylor
from penjing.prune.structural.explain import explain
from penjing.prune.structural.graph import dependency_graph
from penjing.prune.structural.ops import register_op
from penjing.prune.structural.slimming import bn_l1, slim, slimming_loss
from penjing.prune.structural.structured import (
    CHANNEL_STRUCTURES,  # noqa: F401 - what the old name GRANULARITIES gives
    channels,
    channels_,
    groups,
    ratio_for_macs,
)
from penjing.prune.structural.surgery import apply_, load_pruned, save_pruned

__all__ = [
    # the one entry and its configs
    "STRUCTURES",
    "ChannelConfig",
    "HeadConfig",
    "MagnitudeConfig",
    "NMConfig",
    "PatternConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "prune_",
    "sparsegpt_",
    "wanda_",
    "cuts",
    "prune_rounds_",
    # the methods on their own
    "channels",
    "channels_",
    "compact_",
    "heads_",
    "hf_ffn_",
    "hf_heads_",
    "magnitude_",
    "nm_",
    "pattern_",
    "skeleton_",
    "slim",
    "stripes_",
    "Block",
    "Kernel",
    "Shape",
    "Stripe",
    "HeadAttention",
    # scoring, schedules and penalties
    "CRITERIA",
    "taylor",
    "agp",
    "iterative",
    "bn_l1",
    "group_lasso_loss",
    "skeleton_loss",
    "slimming_loss",
    "ratio_for_macs",
    # looking at a model
    "count_hf_macs",
    "dependency_graph",
    "explain",
    "groups",
    "is_nm",
    "is_pattern",
    "masks",
    "get_mask",
    "set_mask_",
    "finalize_",
    # files and extensions
    "apply_",
    "load_pretrained",
    "load_pruned",
    "save_pruned",
    "register_op",
]

# names of earlier releases, answered with a DeprecationWarning
__getattr__ = renamed(__name__, {"GRANULARITIES": "CHANNEL_STRUCTURES"})
