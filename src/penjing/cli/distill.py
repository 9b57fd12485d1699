"""`penjing distill`: teacher(s) and student by name or `module:function`, from model files.

A model is either a penjing model name (`penjing.models.MODELS`, built for the data set's
classes) or `package.module:function`, a function of no arguments that returns an
`nn.Module`. Weights are any model file penjing reads: a pruned student comes back with
its removed channels and live masks. A teacher without weights is trained first. Weights
that are exactly zero in a plain student checkpoint stay zero. The student trained on the
labels alone for the same epochs is the baseline distillation must beat.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from penjing.cli import common
from penjing.core.parametrize import PRUNABLE, set_mask_
from penjing.distill.cache import CachedTeacher
from penjing.distill.ensemble import Ensemble
from penjing.distill.kd import check_hints, check_pair, distill_, example_batch
from penjing.distill.losses import check_temperature, check_weight, resolve_soft_loss
from penjing.train import evaluate, fit, seed_everything


@dataclass(frozen=True)
class DistillSummary:
    """Accuracies measured in one `distill_named` run."""

    teachers: tuple[tuple[str, float], ...]  # (spec, test accuracy) per teacher
    student: str
    student_before: float | None  # the student's accuracy from its checkpoint, if given
    student_accuracy: float
    sparsity: float | None  # fraction of zeros kept in the student's prunable weights
    saved_to: str | None
    baseline: float | None = None  # the same student trained on labels alone, same epochs
    wrote_baseline: bool = False  # keep_better wrote the labels-only student instead

    def format(self) -> str:
        width = max(14, *(len(name) for name, _ in self.teachers), len(self.student))
        lines = [f"{'model':<16} {'name':<{width}} {'test accuracy':>13}"]
        for i, (name, acc) in enumerate(self.teachers):
            role = "teacher" if len(self.teachers) == 1 else f"teacher {i + 1}"
            lines.append(f"{role:<16} {name:<{width}} {acc:>13.2%}")
        if self.student_before is not None:
            lines.append(f"{'student before':<16} {self.student:<{width}} "
                         f"{self.student_before:>13.2%}")
        if self.baseline is not None:
            lines.append(f"{'labels only':<16} {self.student:<{width}} {self.baseline:>13.2%}")
        lines.append(f"{'student':<16} {self.student:<{width}} {self.student_accuracy:>13.2%}")
        if self.baseline is not None:
            gain = 100 * (self.student_accuracy - self.baseline)
            lines.append(f"distillation: {gain:+.2f} points over training on the labels alone")
            if gain < 0 and self.wrote_baseline:
                lines.append("warning: distillation made the student worse, so the student "
                             "trained on the labels alone was written (--keep-better)")
            elif gain < 0:
                lines.append("warning: distillation made the student worse than training on "
                             "the labels alone; try another --temperature or --alpha, more "
                             "--epochs, or --keep-better to write the better of the two")
        if self.sparsity:
            lines.append(f"student sparsity kept: {self.sparsity:.2%} of prunable weights are zero")
        if self.saved_to:
            lines.append(f"student written to {self.saved_to}")
        return "\n".join(lines)


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
    baseline: bool = True,
    keep_better: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> DistillSummary:
    """Distil `teacher` (one spec, or several for an ensemble) into `student` on `dataset`.

    Teachers come from `teacher_weights` (one model file per teacher) or are trained for
    `teacher_epochs`. The student starts from `student_weights` when given (its zeros
    stay zero) and is saved to `out` as a model file (masks live). With `baseline`, a copy
    of the starting student is also trained on the labels alone for the same epochs, and
    its accuracy printed beside the distilled one; with `keep_better` too, that student is
    what `out` gets when it is the more accurate. The distilled student's model file
    records the distillation in its history.
    """
    from penjing.core.model_file import load

    if keep_better and not baseline:
        raise ValueError("--keep-better compares with the student trained on the labels "
                         "alone; leave out --no-baseline")
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
    if not teacher_weights:  # only then do the teachers train
        teacher_epochs = common.epochs(teacher_epochs, "--teacher-epochs")
    epochs = common.epochs(epochs)
    split, train, test = common.load_data(dataset, batch_size, seed)
    # every spec is checked before anything trains, so a typo fails at once
    teacher_factories = [common.factory(spec, split.num_classes, "teacher model")
                         for spec in teachers]
    student_factory = common.factory(student, split.num_classes, "student model")
    teacher_models = []
    for i, build in enumerate(teacher_factories):
        seed_everything(seed + i)
        teacher_models.append(load(teacher_weights[i], build) if teacher_weights else build())
    # A student that cannot learn from these teachers (other classes, a hint layer it lacks)
    # is refused now, not after the teachers have trained.
    probe = student_factory()
    check_hints(hints, teacher_models[0] if len(teachers) == 1 else
                Ensemble(teacher_models, temperature), probe)
    check_pair(teacher_models[0], probe, example_batch(train))
    if not teacher_weights:
        for i, (spec, model) in enumerate(zip(teachers, teacher_models, strict=True)):
            fit(model, train, epochs=teacher_epochs, lr=lr, seed=seed + i, progress=progress,
                desc=f"teacher {spec}")
    for model in teacher_models:
        model.eval()
    teacher_model = (Ensemble(teacher_models, temperature) if len(teacher_models) > 1
                     else teacher_models[0])
    seed_everything(seed + len(teachers))  # the student's initial weights differ from theirs
    student_model = student_factory()
    before = sparsity = None
    if student_weights is not None:
        student_model = load(student_weights, student_factory)
        before = evaluate(student_model, test)
        sparsity = keep_zeros_(student_model)
    baseline_model = copy.deepcopy(student_model) if baseline else None
    if hints is None:  # the same images every epoch: ask the teacher once per image
        teacher_model = CachedTeacher(teacher_model)
    distill_(teacher_model, student_model, train, epochs=epochs, lr=lr, temperature=temperature,
            alpha=alpha, soft=soft, hints=hints, hint_epochs=hint_epochs, seed=seed,
            progress=progress)
    baseline_accuracy = None
    if baseline_model is not None:
        fit(baseline_model, train, epochs=epochs, lr=lr, seed=seed, progress=progress,
            desc="labels only")
        baseline_accuracy = evaluate(baseline_model, test)
    accuracy = evaluate(student_model, test)
    worse = baseline_accuracy is not None and accuracy < baseline_accuracy
    if out is not None:
        common.save_model(baseline_model if keep_better and worse else student_model, out,
                          student)
    return DistillSummary(
        teachers=tuple((spec, evaluate(m, test)) for spec, m in zip(teachers, teacher_models,
                                                                    strict=True)),
        student=student,
        student_before=before,
        student_accuracy=accuracy,
        sparsity=sparsity,
        saved_to=None if out is None else str(out),
        baseline=baseline_accuracy,
        wrote_baseline=keep_better and worse and out is not None,
    )


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "distill", formatter_class=common.HelpFormatter,
        help="knowledge distillation: train a small student on a teacher's soft targets",
        description="Train --student on alpha x the teacher's soft targets at temperature T "
        "(KL scaled by T^2, or MSE on logits) plus (1 - alpha) x the labels, and the same "
        "student on the labels alone as the baseline. A teacher without --teacher-weights "
        "is trained first; several --teacher options distil from their ensemble. A "
        "--student-weights file from penjing prune keeps its pruned channels and zeros.",
    )
    parser.add_argument("--teacher", action="append", required=True, metavar="MODEL",
                        help="penjing model name or package.module:function (repeatable)")
    parser.add_argument("--teacher-weights", action="append", default=[], metavar="FILE",
                        help="model file, one per --teacher in order")
    parser.add_argument("--student", required=True, metavar="MODEL",
                        help="penjing model name (e.g. mlp30, lenet5_thin) or "
                        "package.module:function")
    common.add_weights(parser, flag="--student-weights", what="the student to start from")
    common.add_data(parser)
    common.add_training(parser, 10, "distillation epochs")
    parser.add_argument("--teacher-epochs", type=int, default=10,
                        help="training epochs of a teacher given without weights")
    parser.add_argument("-T", "--temperature", type=float, default=4.0,
                        help="softmax temperature T > 0")
    parser.add_argument("--alpha", type=float, default=0.9,
                        help="weight of the soft targets in [0, 1]; labels get 1 - alpha")
    parser.add_argument("--soft", choices=["kl", "mse"], default="kl",
                        help="soft loss: T^2-scaled KL (Hinton) or MSE on logits")
    parser.add_argument("--hint", nargs=2, metavar=("TEACHER_LAYER", "STUDENT_LAYER"),
                        help="FitNets: train the student up to STUDENT_LAYER to predict "
                        "TEACHER_LAYER first (dotted module names)")
    parser.add_argument("--hint-epochs", type=int, default=2, help="epochs of hint training")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip training the student on the labels alone")
    parser.add_argument("--keep-better", action="store_true",
                        help="write the student trained on the labels alone instead when it "
                        "is the more accurate")
    common.add_out(parser, "the student model file")
    common.add_run(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    summary = distill_named(
        args.teacher, args.student, dataset=args.data, teacher_weights=args.teacher_weights,
        student_weights=args.student_weights, teacher_epochs=args.teacher_epochs,
        epochs=args.epochs, temperature=args.temperature, alpha=args.alpha, soft=args.soft,
        hints=tuple(args.hint) if args.hint else None, hint_epochs=args.hint_epochs, lr=args.lr,
        batch_size=args.batch_size, out=args.out, baseline=not args.no_baseline,
        keep_better=args.keep_better, seed=args.seed, progress=common.progress(args),
    )
    print(summary.format())
