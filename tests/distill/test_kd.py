from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import penjing as pj
from penjing.distill import distill
from penjing.prune import magnitude_, masks


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_soft_targets_alone_teach_the_student(mnist, teacher, test_loader):
    # Random labels and alpha = 1: everything the student learns comes from the teacher.
    images = torch.stack([mnist.train[i][0] for i in range(0, 4000, 4)])
    noise = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, noise), batch_size=50, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    before = state(teacher)
    torch.manual_seed(1)
    student = pj.models.create("mlp30")
    history = distill(teacher, student, loader, epochs=3, alpha=1.0, progress=False)
    assert history.loss[-1] < history.loss[0]
    teacher_acc = pj.train.evaluate(teacher, test_loader)
    assert pj.train.evaluate(student, test_loader) > 0.8 * teacher_acc
    # the teacher is never trained, and is left in the mode it came in
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_pruned_student_stays_pruned(teacher, small_train, test_loader):
    torch.manual_seed(2)
    student = pj.models.create("lenet300")
    pj.train.fit(student, small_train, epochs=2, progress=False)
    magnitude_(student, sparsity=0.9)
    pruned_acc = pj.train.evaluate(student, test_loader)
    kept = {name: mask.clone() for name, mask in masks(student).items()}
    distill(teacher, student, small_train, epochs=1, progress=False)
    for name, module in student.named_modules():
        if name in kept:
            assert torch.equal(masks(student)[name], kept[name]), name
            assert int((module.weight == 0).sum()) == round(0.9 * module.weight.numel()), name
            assert torch.equal(module.weight != 0, kept[name].bool()), name
    assert pj.train.evaluate(student, test_loader) > pruned_acc + 0.02  # it recovers


def test_ensemble_of_teachers_and_mse_on_logits(teacher, small_train):
    torch.manual_seed(3)
    other = pj.models.create("lenet300")
    for soft in ("kl", "mse"):
        student = pj.models.create("mlp30")
        history = distill([teacher, other], student, small_train, epochs=1, soft=soft,
                          progress=False)
        assert len(history.loss) == 1
        assert history.loss[0] > 0


def test_class_mismatch_is_refused_before_training(teacher, small_train):
    student = pj.models.create("mlp30", num_classes=5)
    before = state(student)
    with pytest.raises(ValueError, match="teacher gives 10 logits, the student 5"):
        distill(teacher, student, small_train, epochs=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_non_positive_temperature_is_refused(teacher, small_train, temperature):
    with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
        distill(teacher, pj.models.create("mlp30"), small_train, temperature=temperature)


def test_teacher_cannot_be_the_student(teacher, small_train):
    with pytest.raises(ValueError, match="same module"):
        distill(teacher, teacher, small_train)
