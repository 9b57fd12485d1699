"""`penjing distill` as one function: teacher(s) and student by name or `module:function`.

A model is either a penjing model name (`penjing.models.MODELS`, built for the data set's
classes) or `package.module:function`, a function of no arguments that returns an
`nn.Module`. Weights are safetensors files (`penjing.train.save_checkpoint`). A teacher
without weights is trained first. Weights that are exactly zero in the student's
checkpoint stay zero: a pruned student comes back pruned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from penjing import data, models
from penjing.distill.cache import CachedTeacher
from penjing.distill.ensemble import Ensemble
from penjing.distill.kd import check_hints, check_pair, distill, example_batch
from penjing.distill.losses import check_temperature, check_weight, resolve_soft_loss
from penjing.prune.masks import PRUNABLE, finalize_, set_mask_
from penjing.train import evaluate, fit, load_checkpoint, save_checkpoint, seed_everything


@dataclass(frozen=True)
class DistillSummary:
    """Accuracies measured in one `distill_named` run."""

    teachers: tuple[tuple[str, float], ...]  # (spec, test accuracy) per teacher
    student: str
    student_before: float | None  # the student's accuracy from its checkpoint, if given
    student_accuracy: float
    sparsity: float | None  # fraction of zeros kept in the student's prunable weights
    saved_to: str | None

    def format(self) -> str:
        width = max(14, *(len(name) for name, _ in self.teachers), len(self.student))
        lines = [f"{'model':<16} {'name':<{width}} {'test accuracy':>13}"]
        for i, (name, acc) in enumerate(self.teachers):
            role = "teacher" if len(self.teachers) == 1 else f"teacher {i + 1}"
            lines.append(f"{role:<16} {name:<{width}} {acc:>13.4f}")
        if self.student_before is not None:
            lines.append(f"{'student before':<16} {self.student:<{width}} "
                         f"{self.student_before:>13.4f}")
        lines.append(f"{'student':<16} {self.student:<{width}} {self.student_accuracy:>13.4f}")
        if self.sparsity:
            lines.append(f"student sparsity kept: {self.sparsity:.2%} of prunable weights are zero")
        if self.saved_to:
            lines.append(f"student weights written to {self.saved_to}")
        return "\n".join(lines)


def model_factory(spec: str, role: str = "model") -> Callable[[int], nn.Module]:
    """num_classes -> a fresh model; the spec is checked (one model built) at once."""
    models.build(spec, role=f"{role} model")
    return lambda num_classes: models.build(spec, num_classes, role=f"{role} model")


def keep_zeros_(model: nn.Module) -> float | None:
    """Mask every prunable weight where it is exactly zero; the fraction of zeros, or None."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, PRUNABLE):
            mask = module.weight.detach() != 0
            zeros += int((~mask).sum())
            total += mask.numel()
            if not bool(mask.all()):
                set_mask_(module, mask.to(module.weight.dtype))
    return zeros / total if zeros else None


def distill_named(
    teacher: str | Sequence[str],
    student: str,
    *,
    dataset: str = "mnist",
    teacher_weights: Sequence[str | os.PathLike] = (),
    student_weights: str | os.PathLike | None = None,
    teacher_epochs: int = 10,
    epochs: int = 10,
    temperature: float = 4.0,
    alpha: float = 0.9,
    soft: str = "kl",
    hints: tuple[str, str] | None = None,
    hint_epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 64,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DistillSummary:
    """Distil `teacher` (one spec, or several for an ensemble) into `student` on `dataset`.

    Teachers come from `teacher_weights` (one file per teacher) or are trained for
    `teacher_epochs`. The student starts from `student_weights` when given (its zeros
    stay zero) and is saved to `out` (safetensors, masks baked in).
    """
    check_temperature(temperature)
    check_weight(alpha)
    resolve_soft_loss(soft)
    teachers = [teacher] if isinstance(teacher, str) else list(teacher)
    if not teachers:
        raise ValueError("give at least one teacher")
    if teacher_weights and len(teacher_weights) != len(teachers):
        raise ValueError(
            f"give one weights file per teacher or none: {len(teachers)} teachers, "
            f"{len(teacher_weights)} weights files"
        )
    # every spec is checked before the data set loads, so a typo fails at once
    teacher_factories = [model_factory(spec, "teacher") for spec in teachers]
    student_factory = model_factory(student, "student")
    split = data.load(dataset)
    train, test = data.loaders(split, batch_size=batch_size, seed=seed)
    teacher_models = []
    for i, factory in enumerate(teacher_factories):
        seed_everything(seed + i)
        teacher_models.append(factory(split.num_classes))
    teacher_model = (Ensemble(teacher_models, temperature) if len(teacher_models) > 1
                     else teacher_models[0])
    # A student that cannot learn from these teachers (other classes, a hint layer it lacks)
    # is refused now, not after the teachers have trained.
    probe = student_factory(split.num_classes)
    check_hints(hints, teacher_model, probe)
    check_pair(teacher_model, probe, example_batch(train))
    for i, (spec, model) in enumerate(zip(teachers, teacher_models, strict=True)):
        if teacher_weights:
            load_checkpoint(teacher_weights[i], model)
        else:
            fit(model, train, epochs=teacher_epochs, lr=lr, seed=seed + i, progress=progress,
                desc=f"teacher {spec}")
        model.eval()
    seed_everything(seed + len(teachers))  # the student's initial weights differ from theirs
    student_model = student_factory(split.num_classes)
    before = sparsity = None
    if student_weights is not None:
        load_checkpoint(student_weights, student_model)
        before = evaluate(student_model, test)
        sparsity = keep_zeros_(student_model)
    if hints is None:  # the same images every epoch: ask the teacher once per image
        teacher_model = CachedTeacher(teacher_model)
    distill(teacher_model, student_model, train, epochs=epochs, lr=lr, temperature=temperature,
            alpha=alpha, soft=soft, hints=hints, hint_epochs=hint_epochs, seed=seed,
            progress=progress)
    if sparsity is not None:
        finalize_(student_model)
    if out is not None:
        save_checkpoint(student_model, out)
    return DistillSummary(
        teachers=tuple((spec, evaluate(m, test)) for spec, m in zip(teachers, teacher_models,
                                                                    strict=True)),
        student=student,
        student_before=before,
        student_accuracy=evaluate(student_model, test),
        sparsity=sparsity,
        saved_to=None if out is None else str(out),
    )
