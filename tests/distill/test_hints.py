from __future__ import annotations

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.distill import build_regressor, capture, distill_, hint_loss, regressor, train_hints_


@pytest.mark.parametrize(
    ("student", "teacher", "kind", "shape"),
    [
        ((12, 8, 8), (50, 8, 8), nn.Conv2d, (50, 8, 8)),
        ((12, 8, 8), (50, 4, 4), nn.Sequential, (50, 4, 4)),
        ((60,), (500,), nn.Sequential, (500,)),
        ((12, 4, 4), (500,), nn.Sequential, (500,)),
        ((50, 8, 8), (50, 8, 8), nn.Identity, (50, 8, 8)),
    ],
)
def test_regressor_maps_student_to_teacher_shape(student, teacher, kind, shape):
    reg = regressor(torch.Size(student), torch.Size(teacher))
    assert isinstance(reg, kind)
    assert reg(torch.randn(3, *student)).shape == (3, *shape)


def test_regressor_refuses_vector_to_feature_map():
    with pytest.raises(ValueError, match="cannot regress"):
        regressor(torch.Size([60]), torch.Size([50, 8, 8]))


def test_capture_sees_the_layer_and_removes_its_hook():
    model = pj.models.create("lenet5_thin")
    with capture(model, "conv2") as seen:
        model(torch.randn(2, 1, 28, 28))
    assert seen["out"].shape == (2, 12, 8, 8)
    assert not model.conv2._forward_hooks


def test_unknown_hint_layer_is_refused(teacher, small_train):
    student = pj.models.create("lenet5_thin")
    with pytest.raises(ValueError, match=r"no layer named 'conv9' in the teacher .*'conv2'"):
        distill_(teacher, student, small_train, hints=("conv9", "conv2"))
    with pytest.raises(ValueError, match=r"no layer named 'fc7' in the student"):
        distill_(teacher, student, small_train, hints=("conv2", "fc7"))
    with pytest.raises(ValueError, match="pair"):
        distill_(teacher, student, small_train, hints="conv2")
    with pytest.raises(ValueError, match="pass the teacher itself"):
        distill_(pj.distill.CachedTeacher(teacher), student, small_train, hints=("conv2", "conv2"))


def test_hint_training_moves_only_layers_up_to_the_hint(teacher, small_train):
    torch.manual_seed(4)
    student = pj.models.create("lenet5_thin")
    x = torch.stack([small_train.dataset[i][0] for i in range(200)])
    reg = build_regressor(teacher, student, x[:2], "conv2", "conv2")
    assert isinstance(reg, nn.Conv2d) and reg.out_channels == 50

    def current_hint_loss() -> float:
        with torch.no_grad(), capture(teacher, "conv2") as t, capture(student, "conv2") as s:
            teacher(x)
            student(x)
            return float(hint_loss(reg(s["out"]), t["out"]))

    before, weights = current_hint_loss(), {k: v.clone() for k, v in student.state_dict().items()}
    train_hints_(teacher, student, small_train, "conv2", "conv2", reg=reg, epochs=1,
                 progress=False)
    assert current_hint_loss() < 0.9 * before
    moved = {k for k, v in student.state_dict().items() if not torch.equal(weights[k], v)}
    assert moved == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}


def test_fitnets_two_stages_end_to_end(teacher, small_train, test_loader):
    torch.manual_seed(5)
    student = pj.models.create("lenet5_thin")
    history = distill_(teacher, student, small_train, hints=("conv2", "conv2"), hint_epochs=1,
                      epochs=2, progress=False)
    assert len(history.loss) == 2  # the distillation stage
    assert pj.train.evaluate(student, test_loader) > 0.5  # chance is 0.1
