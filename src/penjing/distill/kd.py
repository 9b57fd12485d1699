"""`distill`: train a student from a teacher (or an ensemble of teachers) on soft targets.

The student trains through `penjing.train.fit`, so anything that keeps a model a plain
`nn.Module` composes: a pruned student (weight masks as parametrizations) stays pruned
because the mask multiplies the weight in every forward, and a student carrying fake
quantization trains quantization-aware while it distils.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from penjing.distill.ensemble import Ensemble
from penjing.distill.hints import build_regressor, train_hints_
from penjing.distill.losses import (
    SoftLoss,
    check_logits,
    check_temperature,
    check_weight,
    kd_loss,
    resolve_soft_loss,
)
from penjing.train import History, fit


def example_batch(loader: Iterable, size: int = 2) -> torch.Tensor:
    """A few inputs from `loader` to probe shapes with, without advancing a shuffled sampler."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        if len(dataset) == 0:
            raise ValueError("the training loader's dataset is empty; give it at least one sample")
        items = [dataset[i] for i in range(min(size, len(dataset)))]
        xs = [item[0] if isinstance(item, tuple | list) else item for item in items]
        return torch.stack(xs)
    for batch in loader:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        return x[:size]
    raise ValueError("the training loader is empty; give it at least one batch")


@torch.no_grad()
def check_pair(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> None:
    """Refuse a teacher and student that do not predict the same classes (eval-mode probe)."""
    if teacher is student:
        raise ValueError("teacher and student are the same module; distil into a separate model")
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        check_logits(student(example), teacher(example))
    finally:
        teacher.train(modes[0])
        student.train(modes[1])


def distill(
    teacher: nn.Module | Sequence[nn.Module],
    student: nn.Module,
    loader: Iterable,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.9,
    soft: str | SoftLoss = "kl",
    hints: tuple[str, str] | None = None,
    hint_epochs: int = 2,
    optimizer: str = "adam",
    test_loader: Iterable | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> History:
    """Train `student` in place on alpha · soft targets + (1 − alpha) · labels; return its history.

    - `teacher`: a trained model, or a list of them (averaged as an `Ensemble` at the
      same temperature). It runs in eval mode without gradients and is never changed.
    - `soft`: "kl" (Hinton's T²-scaled KL), "mse" (squared error on logits) or a callable
      (student_logits, teacher_logits, temperature) -> loss.
    - `hints=(teacher_layer, student_layer)`: FitNets; first `hint_epochs` epochs of hint
      training through a regressor, then `epochs` epochs of distillation.

    >>> distill(teacher, student, train_loader, epochs=10, temperature=4.0, alpha=0.9)
    >>> distill([t1, t2, t3], student, train_loader)                 # teacher ensemble
    >>> distill(teacher, student, train_loader, hints=("conv2", "conv2"))   # FitNets
    """
    temperature = check_temperature(temperature)
    alpha = check_weight(alpha)
    soft = resolve_soft_loss(soft)
    if isinstance(teacher, Sequence):
        teacher = Ensemble(teacher, temperature)
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise TypeError(
            f"teacher and student must be nn.Modules, got {type(teacher).__name__} and "
            f"{type(student).__name__}"
        )
    if isinstance(teacher, Ensemble) and teacher.temperature != temperature:
        raise ValueError(
            f"the ensemble averages at T = {teacher.temperature} but distillation uses "
            f"T = {temperature}; build Ensemble(teachers, temperature={temperature})"
        )
    if hint_epochs < 0:
        raise ValueError(f"hint_epochs must be >= 0, got {hint_epochs}")
    example = example_batch(loader)
    check_pair(teacher, student, example)

    teacher_mode = teacher.training
    teacher.eval()
    try:
        if hints is not None:
            if not (isinstance(hints, tuple | list) and len(hints) == 2):
                raise ValueError(
                    f"hints must be a pair (teacher_layer, student_layer), got {hints!r}"
                )
            teacher_layer, student_layer = hints
            reg = build_regressor(teacher, student, example, teacher_layer, student_layer)
            train_hints_(
                teacher, student, loader, teacher_layer, student_layer, reg=reg,
                epochs=hint_epochs, lr=lr, optimizer=optimizer, seed=seed, progress=progress,
            )

        def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher(x)
            return kd_loss(model(x), teacher_logits, y, temperature=temperature, alpha=alpha,
                           soft=soft)

        return fit(
            student, loader, epochs=epochs, lr=lr, optimizer=optimizer, loss_fn=loss_fn,
            test_loader=test_loader, seed=seed, progress=progress, desc="distill",
        )
    finally:
        teacher.train(teacher_mode)
