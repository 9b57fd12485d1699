"""Distillation losses: Hinton's soft targets with temperature, soft + hard mix, MSE on logits.

Every loss takes batched logits shaped (N, classes) and returns a scalar, the mean over the
batch. Soft targets are computed with log-softmax on both sides, so large logits or a small
temperature do not overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

SoftLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

UNLABELED = -1  # the label of an image that has none: only the teacher teaches on it


def check_temperature(temperature: float) -> float:
    """`temperature` as a float, or an error when it is not a number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a number > 0, got {temperature!r}")
    if not float(temperature) > 0.0:  # also refuses NaN
        raise ValueError(
            f"temperature must be > 0, got {temperature}; T = 1 is the plain softmax, "
            "Hinton et al. use T between 2 and 20"
        )
    return float(temperature)


def check_weight(alpha: float, what: str = "alpha") -> float:
    """`alpha` as a float, or an error when it is not a weight in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"{what} must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {alpha}; 0.9 puts 90 % on soft targets")
    return float(alpha)


def check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Refuse student and teacher outputs that do not describe the same classes."""
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"distillation compares logits shaped (batch, classes); got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"teacher and student must predict the same classes: the teacher gives "
            f"{teacher.shape[1]} logits, the student {student.shape[1]}; build the student "
            f"with num_classes={teacher.shape[1]}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"teacher and student saw different batches: {teacher.shape[0]} and "
            f"{student.shape[0]} rows"
        )


def soft_target(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton's soft-target loss: T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch.

    The T² factor keeps the gradient's size independent of T (the gradient of the KL
    shrinks as 1/T²), so the weight against the hard loss need not change with T.
    """
    t = check_temperature(temperature)
    check_logits(student_logits, teacher_logits)
    log_p_student = nn.functional.log_softmax(student_logits / t, dim=1)
    log_p_teacher = nn.functional.log_softmax(teacher_logits / t, dim=1)
    kl = nn.functional.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def logit_mse(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Squared error between logits, summed over classes and averaged over the batch.

    This is the high-temperature limit of the soft-target loss when logits have zero
    mean (Hinton et al., §2.1; Ba & Caruana), up to a factor 1/(2·classes); the temperature
    is accepted so that it plugs in where `soft_target` does, and is not used.
    """
    check_logits(student_logits, teacher_logits)
    return ((student_logits - teacher_logits) ** 2).sum(dim=1).mean()


SOFT_LOSSES: dict[str, SoftLoss] = {"kl": soft_target, "mse": logit_mse}


def resolve_soft_loss(soft: str | SoftLoss) -> SoftLoss:
    """A soft loss by name (one of SOFT_LOSSES) or the callable itself."""
    if callable(soft):
        return soft
    if soft not in SOFT_LOSSES:
        raise ValueError(
            f"unknown soft loss {soft!r}; choose one of {sorted(SOFT_LOSSES)} or pass a "
            "callable (student_logits, teacher_logits, temperature) -> loss"
        )
    return SOFT_LOSSES[soft]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    soft: str | SoftLoss = "kl",
) -> torch.Tensor:
    """alpha · soft loss + (1 − alpha) · cross-entropy on the labels.

    Hinton et al. found a considerably lower weight on the hard labels works best, hence
    alpha = 0.9. With `targets=None` (unlabelled data) only the soft part is used; rows
    labelled `UNLABELED` (-1) count in the soft part only, so a transfer set can mix
    labelled and unlabelled images.
    """
    alpha = check_weight(alpha)
    soft_part = resolve_soft_loss(soft)(student_logits, teacher_logits, temperature)
    if targets is None or alpha == 1.0:
        return soft_part
    labelled = targets != UNLABELED
    if not bool(labelled.any()):
        return soft_part
    hard_part = nn.functional.cross_entropy(student_logits[labelled], targets[labelled])
    return alpha * soft_part + (1.0 - alpha) * hard_part
