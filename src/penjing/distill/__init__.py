"""Knowledge distillation: soft targets, hints, hidden states of encoders, ensembles, mutual
and data distillation."""

from __future__ import annotations

from penjing.distill.cache import CachedTeacher
from penjing.distill.data_distillation import (
    DataDistillation,
    PseudoLabels,
    data_distill_,
    pseudo_label,
)
from penjing.distill.ensemble import Ensemble
from penjing.distill.hidden import (
    HIDDEN_LOSSES,
    HiddenLossFn,
    distill_hidden_,
    hidden_loss,
    mean_pool,
)
from penjing.distill.hints import build_regressor, capture, hint_loss, regressor, train_hints_
from penjing.distill.kd import DistillLoss, distill_
from penjing.distill.losses import SOFT_LOSSES, UNLABELED, kd_loss, logit_mse, soft_target
from penjing.distill.mutual import mutual_, mutual_losses
from penjing.distill.transforms import (
    LABEL_PRESERVING,
    TRANSFORMS,
    Augmented,
    rotate,
    scale,
    shift,
)
from penjing.errors import renamed

__all__ = [
    "HIDDEN_LOSSES",
    "LABEL_PRESERVING",
    "SOFT_LOSSES",
    "TRANSFORMS",
    "UNLABELED",
    "Augmented",
    "CachedTeacher",
    "DataDistillation",
    "DistillLoss",
    "Ensemble",
    "HiddenLossFn",
    "PseudoLabels",
    "build_regressor",
    "capture",
    "data_distill_",
    "distill_",
    "distill_hidden_",
    "hidden_loss",
    "hint_loss",
    "kd_loss",
    "logit_mse",
    "mean_pool",
    "mutual_",
    "mutual_losses",
    "pseudo_label",
    "regressor",
    "rotate",
    "scale",
    "shift",
    "soft_target",
    "train_hints_",
]

# names of earlier releases, answered with a DeprecationWarning
__getattr__ = renamed(__name__, {"distill": "distill_", "data_distill": "data_distill_"})
