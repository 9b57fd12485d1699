from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import penjing as pj
from penjing.distill import DistillLoss, distill_
from penjing.prune import magnitude_, masks

from .conftest import train_loader


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
    history = distill_(teacher, student, loader, epochs=3, alpha=1.0, progress=False)
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
    distill_(teacher, student, small_train, epochs=1, progress=False)
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
        history = distill_([teacher, other], student, small_train, epochs=1, soft=soft,
                          progress=False)
        assert len(history.loss) == 1
        assert history.loss[0] > 0


def test_class_mismatch_is_refused_before_training(teacher, small_train):
    student = pj.models.create("mlp30", num_classes=5)
    before = state(student)
    with pytest.raises(ValueError, match="teacher gives 10 logits, the student 5"):
        distill_(teacher, student, small_train, epochs=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_non_positive_temperature_is_refused(teacher, small_train, temperature):
    with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
        distill_(teacher, pj.models.create("mlp30"), small_train, temperature=temperature)


def test_teacher_cannot_be_the_student(teacher, small_train):
    with pytest.raises(ValueError, match="same module"):
        distill_(teacher, teacher, small_train)


def noisy_label_loader(mnist, n: int = 1000) -> DataLoader:
    """Training images with random labels: only soft targets can teach anything on them."""
    images = torch.stack([mnist.train[i][0] for i in range(0, 4 * n, 4)])
    noise = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(images, noise), batch_size=50, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def test_weight_fake_quant_student_distils_on_the_grid(mnist, teacher, test_loader):
    # QAT + KD through distill: 4-bit fake-quantized weights (straight-through estimator).
    torch.manual_seed(8)
    student = pj.models.create("mlp30")
    pj.quant.quantize_(student, pj.quant.weight_only(bits=4), qat=True)
    originals = {n: m.parametrizations.weight.original.detach().clone()
                 for n, m in student.named_modules() if pj.quant.get_weight_quant(m) is not None}
    assert set(originals) == {"fc1", "fc2"}
    distill_(teacher, student, noisy_label_loader(mnist), epochs=3, alpha=1.0, progress=False)
    pj.quant.freeze_(student)
    for name, module in student.named_modules():
        if name in originals:
            assert not torch.equal(module.parametrizations.weight.original, originals[name])
            for row in module.weight.detach():  # per output channel: at most 2^4 levels
                assert row.unique().numel() <= 16, name
    assert pj.train.evaluate(student, test_loader) > 0.7  # random labels: all from the teacher


def test_qat_with_the_distillation_loss(mnist, teacher, test_loader):
    # QAT + KD through pj.quant.qat: INT8 weights and activations, loss from the teacher.
    torch.manual_seed(9)
    student = pj.models.create("mlp30")
    before = state(teacher)
    q = pj.quant.qat(student, noisy_label_loader(mnist), pj.quant.int8(), epochs=3, lr=1e-3,
                     loss_fn=DistillLoss(teacher, alpha=1.0), progress=False)
    assert len(pj.quant.activation_quantizers(q)) >= 2
    # trained on random labels, so everything it knows came through the distillation loss
    assert pj.train.evaluate(q, test_loader) > 0.7
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_pruned_and_fake_quantized_student_keeps_its_zeros(teacher, small_train):
    torch.manual_seed(10)
    student = pj.models.create("lenet300")
    magnitude_(student, sparsity=0.8)
    kept = {name: mask.clone() for name, mask in masks(student).items()}
    pj.quant.quantize_(student, pj.quant.weight_only(bits=8), qat=True)  # stacked after the mask
    distill_(teacher, student, small_train, epochs=1, progress=False)
    for name, module in student.named_modules():
        if name in kept:
            assert torch.equal(module.weight != 0, kept[name].bool()), name
            assert int((module.weight == 0).sum()) == round(0.8 * module.weight.numel()), name


def test_distill_loss_refuses_bad_settings(teacher):
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        DistillLoss(teacher, temperature=0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got -0.1"):
        DistillLoss(teacher, alpha=-0.1)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        DistillLoss("lenet5")
    ensemble = pj.distill.Ensemble([teacher], temperature=2.0)
    with pytest.raises(ValueError, match=r"averages at T = 2.0 but distillation uses T = 4.0"):
        DistillLoss(ensemble, temperature=4.0)
    with pytest.raises(ValueError, match=r"averages at T = 2.0 but distillation uses T = 4.0"):
        DistillLoss(pj.distill.CachedTeacher(ensemble), temperature=4.0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))
    with pytest.raises(ValueError, match="teacher gives 10 logits, the student 3"):
        DistillLoss(teacher)(student, torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))


def test_bad_epochs_and_hints_are_refused(teacher, small_train):
    student = pj.models.create("mlp30")
    with pytest.raises(ValueError, match="epochs must be >= 0, got -1"):
        distill_(teacher, student, small_train, epochs=-1)
    with pytest.raises(ValueError, match="hint_epochs must be >= 0, got -2"):
        distill_(teacher, student, small_train, hint_epochs=-2)
    with pytest.raises(TypeError, match="student must be an nn.Module, got str"):
        distill_(teacher, "mlp30", small_train)


def test_cached_teacher_runs_once_per_image_and_answers_the_same(mnist, teacher, small_train):
    cached = pj.distill.CachedTeacher(teacher)
    x = torch.stack([small_train.dataset[i][0] for i in range(40)])
    torch.testing.assert_close(cached(x), teacher(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached(x.flip(0)), teacher(x).flip(0), rtol=1e-5, atol=1e-5)
    assert cached.computed == 40  # the second, reordered batch came from memory
    torch.manual_seed(12)
    first = pj.models.create("mlp30")
    second = pj.models.create("mlp30")
    second.load_state_dict(first.state_dict())
    # two loaders with the same seed: the same batches in the same order
    plain = distill_(teacher, first, train_loader(mnist), epochs=2, progress=False)
    fast = distill_(cached, second, train_loader(mnist), epochs=2, progress=False)
    assert cached.computed == 40 + len(small_train.dataset) - 40  # 40 were already known
    assert fast.loss == pytest.approx(plain.loss, rel=1e-4)
    cached.train()
    assert not cached.training and not teacher.training
