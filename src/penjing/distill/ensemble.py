"""Teacher ensembles (model distillation): one teacher whose soft targets are the average
of several teachers' softened outputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from penjing.distill.losses import check_temperature


class Ensemble(nn.Module):
    """Several teachers seen as one: forward returns T · log(mean_i softmax(z_i / T)).

    Those logits are chosen so that softmax(logits / T) is exactly the mean of the
    teachers' distributions at temperature T, which is what Hinton et al. distil from an
    ensemble. Every distillation loss and `distill` therefore take an Ensemble as an
    ordinary teacher; its argmax is the ensemble's vote. Use the same T as the loss.
    """

    def __init__(self, teachers: Sequence[nn.Module], temperature: float = 4.0) -> None:
        super().__init__()
        teachers = list(teachers)
        if not teachers:
            raise ValueError("an ensemble needs at least one teacher, got an empty list")
        for i, teacher in enumerate(teachers):
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"teacher {i} must be an nn.Module, got {type(teacher).__name__}")
        self.teachers = nn.ModuleList(teachers)
        self.temperature = check_temperature(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_probs = []
        for i, teacher in enumerate(self.teachers):
            logits = teacher(x)
            if log_probs and logits.shape != log_probs[0].shape:
                raise ValueError(
                    f"every teacher of an ensemble must give the same classes: teacher 0 gives "
                    f"{tuple(log_probs[0].shape)}, teacher {i} gives {tuple(logits.shape)}"
                )
            log_probs.append(nn.functional.log_softmax(logits / t, dim=1))
        # log of the mean probability, without leaving log space (no underflow at small T)
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        return t * mean
