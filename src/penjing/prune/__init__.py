"""Pruning: masks that fine-tuning keeps, magnitude criteria, schedules, and structured
pruning that physically removes channels (dependency graph, groups, surgery)."""

from __future__ import annotations

from penjing.prune.criteria import taylor
from penjing.prune.graph import DependencyGraph, dependency_graph
from penjing.prune.groups import Group, Slice
from penjing.prune.magnitude import check_sparsity, magnitude_
from penjing.prune.masks import PRUNABLE, Mask, finalize_, get_mask, masks, select_layers, set_mask_
from penjing.prune.nm import is_nm, nm_, nm_mask
from penjing.prune.schedule import agp, iterative
from penjing.prune.slimming import bn_l1, slim, slimming_loss
from penjing.prune.structured import channels, channels_, groups
from penjing.prune.surgery import Change, apply_, load_pruned, save_pruned

__all__ = [
    "PRUNABLE",
    "Change",
    "DependencyGraph",
    "Group",
    "Mask",
    "Slice",
    "agp",
    "apply_",
    "bn_l1",
    "channels",
    "channels_",
    "check_sparsity",
    "dependency_graph",
    "finalize_",
    "get_mask",
    "groups",
    "is_nm",
    "iterative",
    "load_pruned",
    "magnitude_",
    "masks",
    "nm_",
    "nm_mask",
    "save_pruned",
    "select_layers",
    "set_mask_",
    "slim",
    "slimming_loss",
    "taylor",
]
