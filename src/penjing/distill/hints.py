"""FitNets hints (Romero et al., ICLR 2015): a student layer learns to predict a teacher layer.

Features are captured with forward hooks on the named layers, so neither model is
rewritten. When the shapes differ, a small regressor maps the student's features to the
teacher's: a 1×1 convolution between feature maps (followed by adaptive average pooling
when the spatial sizes differ), a linear layer between vectors (a student feature map is
flattened first). Stage 1 of FitNets trains the student up to its hint layer, plus the
regressor, on the L2 distance; stage 2 is ordinary distillation (see `distill`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn

from penjing.core.modes import eval_mode
from penjing.train import History, fit, make_optimizer


def find_layer(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The submodule of `model` called `name` (a dotted path), or an error listing the names."""
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or name == "":
        names = [n for n in modules if n and "parametrizations" not in n]
        raise ValueError(
            f"no layer named {name!r} in the {role} ({type(model).__name__}); "
            f"layers it has: {names}"
        )
    return modules[name]


@contextmanager
def capture(model: nn.Module, name: str, role: str = "model") -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of layer `name` at every forward, under key "out", while open.

    >>> with capture(model, "conv2") as seen:
    ...     model(x); seen["out"].shape
    """
    layer = find_layer(model, name, role)
    seen: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"hint layer {name!r} returns a {type(output).__name__}, not a tensor; "
                "name a layer whose output is a single tensor"
            )
        seen["out"] = output

    handle = layer.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def regressor(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
    """The smallest map from one sample's student features to the teacher's shape.

    Shapes exclude the batch dimension: (C, H, W) for feature maps, (F,) for vectors.
    """
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        conv = nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1)
        if student_shape[1:] == teacher_shape[1:]:
            return conv
        return nn.Sequential(conv, nn.AdaptiveAvgPool2d(teacher_shape[1:]))
    if len(teacher_shape) == 1:
        features = 1
        for size in student_shape:
            features *= size
        return nn.Sequential(nn.Flatten(1), nn.Linear(features, teacher_shape[0]))
    raise ValueError(
        f"cannot regress student features shaped {student_shape} onto teacher features "
        f"shaped {teacher_shape}; hint layers must give feature maps (C, H, W) on both sides, "
        "or a vector on the teacher's side"
    )


@torch.no_grad()
def build_regressor(
    teacher: nn.Module,
    student: nn.Module,
    example: torch.Tensor,
    teacher_layer: str,
    student_layer: str,
) -> nn.Module:
    """Run `example` through both models (eval mode) and build the regressor for their hints."""
    with eval_mode(teacher, student), capture(teacher, teacher_layer, "teacher") as t, capture(
        student, student_layer, "student"
    ) as s:
        teacher(example)
        student(example)
    reg = regressor(s["out"].shape[1:], t["out"].shape[1:])
    return reg.to(device=s["out"].device, dtype=s["out"].dtype)


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets' L2 hint loss: mean squared difference between (regressed) features."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"hint features must have the same shape after the regressor, got student "
            f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}"
        )
    return nn.functional.mse_loss(student_features, teacher_features)


def train_hints_(
    teacher: nn.Module,
    student: nn.Module,
    loader: Iterable,
    teacher_layer: str,
    student_layer: str,
    *,
    reg: nn.Module,
    epochs: int = 2,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int | None = 0,
    progress: bool = True,
) -> History:
    """FitNets stage 1, in place: train the student up to its hint layer, and `reg`, on hints.

    Layers after the hint layer get no gradient, so the optimizer leaves them as they are.
    """
    def loss_fn(model: nn.Module, x: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), capture(teacher, teacher_layer, "teacher") as t:
            teacher(x)
        with capture(model, student_layer, "student") as s:
            model(x)
        return hint_loss(reg(s["out"]), t["out"])

    opt = make_optimizer(chain(student.parameters(), reg.parameters()), optimizer, lr)
    reg.train()
    with eval_mode(teacher):
        return fit(
            student, loader, epochs=epochs, optimizer=opt, loss_fn=loss_fn, seed=seed,
            progress=progress, desc="hints",
        )
