"""`penjing distill` as one function: models by name, a teacher from a checkpoint or trained."""

from __future__ import annotations

import os
from dataclasses import dataclass

from penjing import data, models
from penjing.distill.kd import distill
from penjing.train import evaluate, fit, load_checkpoint, save_checkpoint, seed_everything


@dataclass(frozen=True)
class DistillSummary:
    """Accuracies measured in one `distill_named` run."""

    teacher: str
    student: str
    teacher_accuracy: float
    student_accuracy: float
    saved_to: str | None

    def format(self) -> str:
        lines = [
            f"{'model':<10} {'name':<14} {'test accuracy':>13}",
            f"{'teacher':<10} {self.teacher:<14} {self.teacher_accuracy:>13.4f}",
            f"{'student':<10} {self.student:<14} {self.student_accuracy:>13.4f}",
        ]
        if self.saved_to:
            lines.append(f"student weights written to {self.saved_to}")
        return "\n".join(lines)


def distill_named(
    teacher: str,
    student: str,
    *,
    dataset: str = "mnist",
    teacher_weights: str | os.PathLike | None = None,
    teacher_epochs: int = 10,
    epochs: int = 10,
    temperature: float = 4.0,
    alpha: float = 0.9,
    lr: float = 1e-3,
    batch_size: int = 64,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DistillSummary:
    """Distil penjing model `teacher` into `student` on a bundled data set.

    The teacher's weights come from a safetensors checkpoint, or, without one, it trains
    for `teacher_epochs` first. The student's weights are saved to `out` (safetensors).
    """
    split = data.load(dataset)
    train, test = data.loaders(split, batch_size=batch_size, seed=seed)
    seed_everything(seed)
    teacher_model = models.create(teacher, num_classes=split.num_classes)
    if teacher_weights is not None:
        load_checkpoint(teacher_weights, teacher_model)
    else:
        fit(teacher_model, train, epochs=teacher_epochs, lr=lr, seed=seed, progress=progress,
            desc="teacher")
    seed_everything(seed + 1)  # the student's initial weights do not depend on the teacher's
    student_model = models.create(student, num_classes=split.num_classes)
    distill(teacher_model, student_model, train, epochs=epochs, lr=lr, temperature=temperature,
            alpha=alpha, seed=seed, progress=progress)
    if out is not None:
        save_checkpoint(student_model, out)
    return DistillSummary(
        teacher=teacher,
        student=student,
        teacher_accuracy=evaluate(teacher_model, test),
        student_accuracy=evaluate(student_model, test),
        saved_to=None if out is None else str(out),
    )
