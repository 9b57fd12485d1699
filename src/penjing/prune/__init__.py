"""Pruning: masks that fine-tuning keeps, magnitude criteria, schedules."""

from __future__ import annotations

from penjing.prune.magnitude import check_sparsity, magnitude_
from penjing.prune.masks import PRUNABLE, Mask, finalize_, get_mask, masks, select_layers, set_mask_
from penjing.prune.schedule import agp, iterative

__all__ = [
    "PRUNABLE",
    "Mask",
    "agp",
    "check_sparsity",
    "finalize_",
    "get_mask",
    "iterative",
    "magnitude_",
    "masks",
    "select_layers",
    "set_mask_",
]
