"""`distill`: train a student from a teacher (or an ensemble of teachers) on soft targets.

The student trains through `penjing.train.fit`, so anything that keeps a model a plain
`nn.Module` composes: a pruned student (weight masks as parametrizations) stays pruned
because the mask multiplies the weight in every forward, and a student carrying fake
quantization trains quantization-aware while it distils.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from penjing.core import history
from penjing.core.modes import eval_mode
from penjing.core.steps import Step
from penjing.distill.cache import CachedTeacher
from penjing.distill.ensemble import Ensemble
from penjing.distill.hints import build_regressor, find_layer, train_hints_
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
    with eval_mode(teacher, student):
        check_logits(student(example), teacher(example))


def check_hints(
    hints: tuple[str, str] | None, teacher: nn.Module, student: nn.Module
) -> tuple[str, str] | None:
    """`hints` as a (teacher layer, student layer) pair of layers that exist, or an error."""
    if hints is None:
        return None
    if not (isinstance(hints, tuple | list) and len(hints) == 2):
        raise ValueError(
            f"hints must be a pair (teacher_layer, student_layer), got {hints!r}; "
            "e.g. hints=('conv2', 'conv2')"
        )
    if isinstance(teacher, CachedTeacher):
        raise ValueError(
            "hints read the teacher's layers in every forward, which a CachedTeacher skips "
            "for images it has seen; pass the teacher itself when distilling with hints"
        )
    find_layer(teacher, hints[0], "teacher")
    find_layer(student, hints[1], "student")
    return hints[0], hints[1]


class DistillLoss:
    """The distillation loss as a `penjing.train.fit` loss_fn(model, x, y), for any loop.

    This is how distillation composes with a training loop penjing already has, e.g.
    quantization-aware training distilled from the float model (QAT + KD):

    >>> q = pj.quant.qat(student, train_loader, pj.quant.int8(), epochs=3,
    ...                  loss_fn=DistillLoss(teacher))

    The teacher (a list of teachers becomes an `Ensemble`) is put in eval mode and runs
    without gradients; it is never changed.
    """

    def __init__(
        self,
        teacher: nn.Module | Sequence[nn.Module],
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        soft: str | SoftLoss = "kl",
    ) -> None:
        self.temperature = check_temperature(temperature)
        self.alpha = check_weight(alpha)
        self.soft = resolve_soft_loss(soft)
        if isinstance(teacher, Sequence) and not isinstance(teacher, str):
            teacher = Ensemble(teacher, self.temperature)
        if not isinstance(teacher, nn.Module):
            raise TypeError(
                f"teacher must be an nn.Module or a list of them, got {type(teacher).__name__}"
            )
        inner = teacher.teacher if isinstance(teacher, CachedTeacher) else teacher
        if isinstance(inner, Ensemble) and inner.temperature != self.temperature:
            raise ValueError(
                f"the ensemble averages at T = {inner.temperature} but distillation uses "
                f"T = {self.temperature}; build Ensemble(teachers, temperature={self.temperature})"
            )
        self.teacher = teacher.eval()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return kd_loss(model(x), teacher_logits, y, temperature=self.temperature,
                       alpha=self.alpha, soft=self.soft)


def distill_(
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
    - A pruned student (masks from `pj.prune.magnitude_`) keeps exactly its zeros; a
      student with fake-quantized weights (`pj.quant.quantize_(..., qat=True)`) trains
      quantization-aware. For INT8 weights and activations, hand `DistillLoss(teacher)`
      to `pj.quant.qat` as its loss_fn.

    >>> distill_(teacher, student, train_loader, epochs=10, temperature=4.0, alpha=0.9)
    >>> distill_([t1, t2, t3], student, train_loader)                 # teacher ensemble
    >>> distill_(teacher, student, train_loader, hints=("conv2", "conv2"))   # FitNets
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if hint_epochs < 0:
        raise ValueError(f"hint_epochs must be >= 0, got {hint_epochs}")
    given = teacher if isinstance(teacher, Sequence) else [teacher]
    # the teacher leaves in the mode it came in
    with eval_mode(*(m for m in given if isinstance(m, nn.Module))):
        loss_fn = DistillLoss(teacher, temperature=temperature, alpha=alpha, soft=soft)
        teacher = loss_fn.teacher
        hints = check_hints(hints, teacher, student)
        example = example_batch(loader)
        check_pair(teacher, student, example)
        if hints is not None:
            teacher_layer, student_layer = hints
            reg = build_regressor(teacher, student, example, teacher_layer, student_layer)
            train_hints_(
                teacher, student, loader, teacher_layer, student_layer, reg=reg,
                epochs=hint_epochs, lr=lr, optimizer=optimizer, seed=seed, progress=progress,
            )
        result = fit(
            student, loader, epochs=epochs, lr=lr, optimizer=optimizer, loss_fn=loss_fn,
            test_loader=test_loader, seed=seed, progress=progress, desc="distill",
        )
    history.record(student, {
        "op": "distill", "teachers": _teacher_names(given),
        "temperature": float(temperature), "alpha": float(alpha),
        "soft": soft if isinstance(soft, str) else getattr(soft, "__name__", "custom"),
        "epochs": int(epochs), "hints": list(hints) if hints is not None else None,
    })
    return result


def _teacher_names(teachers: Sequence) -> list[str]:
    """The class names of the teachers behind a cache or an ensemble."""
    names = []
    for teacher in teachers:
        while isinstance(teacher, CachedTeacher):
            teacher = teacher.teacher
        if isinstance(teacher, Ensemble):
            names += _teacher_names(list(teacher.teachers))
        else:
            names.append(type(teacher).__name__)
    return names


def _check_record(record: dict) -> None:
    """A distill record read from a file: what it says must be readable as such."""
    teachers = record.get("teachers")
    if not (isinstance(teachers, list) and all(isinstance(t, str) for t in teachers)):
        raise ValueError(f"a distill step's teachers must be a list of names, got {teachers!r}")
    epochs = record.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"a distill step's epochs must be an int >= 0, got {epochs!r}")
    for key in ("temperature", "alpha"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise ValueError(f"a distill step's {key} must be a finite number, got {value!r}")
    if not isinstance(record.get("soft"), str):
        raise ValueError(f"a distill step's soft loss must be a name, got "
                         f"{record.get('soft')!r}")


# Distillation changes weights only: the record says how they were trained, and replaying
# it on a fresh model changes nothing but the history.
STEP = Step("distill", history.replaying(lambda model, record: None), check=_check_record,
            help="trained by knowledge distillation (penjing.distill.distill_)")
