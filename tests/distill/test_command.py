"""`penjing distill` end to end on a tiny budget: built-in and user models, pruned students."""

from __future__ import annotations

import re

import pytest
import torch

import penjing as pj
from penjing.cli import main
from penjing.cli.distill import distill_named

USER_MODELS = '''
from torch import nn

def tiny():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))

def not_a_model():
    return "tiny"
'''


@pytest.fixture(scope="module")
def teacher_file(teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "lenet5.safetensors"
    pj.train.save_checkpoint(teacher, path)
    return path


def accuracy_printed(out: str, role: str) -> float:
    return float(re.search(rf"^{role}\s+\S+\s+([0-9.]+)%$", out, re.M).group(1)) / 100


def run(args, capsys, baseline: bool = False) -> tuple[int, str, str]:
    code = main(["distill", *args, "--quiet", *([] if baseline else ["--no-baseline"])])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_distills_a_builtin_student_and_saves_it(teacher, teacher_file, test_loader, tmp_path,
                                                 capsys):
    out = tmp_path / "student.safetensors"
    code, printed, _ = run(["--teacher", "lenet5", "--teacher-weights", str(teacher_file),
                            "--student", "mlp30", "--epochs", "1", "--out", str(out)], capsys)
    assert code == 0
    teacher_accuracy = pj.train.evaluate(teacher, test_loader)
    assert accuracy_printed(printed, "teacher") == pytest.approx(teacher_accuracy, abs=5e-5)
    student = pj.load(out, pj.models.create("mlp30"))
    measured = pj.train.evaluate(student, test_loader)
    assert accuracy_printed(printed, "student") == pytest.approx(measured, abs=5e-5)
    assert measured > 0.6  # one epoch at T = 4; chance is 0.1


def test_pruned_student_comes_back_pruned(teacher_file, test_loader, tmp_path, capsys):
    torch.manual_seed(11)
    pruned = pj.models.create("lenet300")
    pj.prune.magnitude_(pruned, sparsity=0.9)
    pj.prune.finalize_(pruned)
    zeros = {k: v == 0 for k, v in pruned.state_dict().items() if k.endswith("weight")}
    start, out = tmp_path / "pruned.safetensors", tmp_path / "distilled.safetensors"
    pj.train.save_checkpoint(pruned, start)
    code, printed, _ = run(["--teacher", "lenet5", "--teacher-weights", str(teacher_file),
                            "--student", "lenet300", "--student-weights", str(start),
                            "--epochs", "1", "--out", str(out)], capsys, baseline=True)
    assert code == 0
    assert "student sparsity kept: 90.00%" in printed
    student = pj.load(out, pj.models.create("lenet300"))
    assert set(pj.prune.masks(student)) == {"fc1", "fc2", "fc3"}  # the masks stay live
    pj.finalize_(student)
    state = student.state_dict()
    for name, was_zero in zeros.items():
        assert torch.equal(state[name] == 0, was_zero), name
    assert accuracy_printed(printed, "student") > accuracy_printed(printed, "student before")
    # the same pruned student trained on the labels alone, same epochs, is printed beside it
    baseline = accuracy_printed(printed, "labels only")
    gain = float(re.search(r"distillation: ([+-][\d.]+) points", printed).group(1))
    assert gain == pytest.approx(100 * (accuracy_printed(printed, "student") - baseline), abs=0.02)


def test_several_teachers_are_distilled_as_an_ensemble(teacher_file, capsys):
    code, printed, err = run(["--teacher", "lenet5", "--teacher-weights", str(teacher_file),
                              "--teacher", "lenet5", "--teacher-weights", str(teacher_file),
                              "--student", "mlp30", "--epochs", "1", "-T", "2"], capsys)
    assert code == 0, err
    assert accuracy_printed(printed, "teacher 1") == accuracy_printed(printed, "teacher 2")
    assert accuracy_printed(printed, "student") > 0.6


def test_user_models_by_module_and_function(teacher_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "distill_user_models.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    code, printed, err = run(["--teacher", "lenet5", "--teacher-weights", str(teacher_file),
                              "--student", "distill_user_models:tiny", "--epochs", "1"], capsys)
    assert code == 0, err
    assert accuracy_printed(printed, "student") > 0.7  # a linear model after one epoch
    code, _, err = run(["--teacher", "lenet5", "--teacher-weights", str(teacher_file),
                        "--student", "distill_user_models:five_classes"], capsys)
    assert code == 2 and "teacher gives 10 logits, the student 5" in err
    code, _, err = run(["--teacher", "lenet5", "--teacher-weights", str(teacher_file),
                        "--student", "distill_user_models:not_a_model"], capsys)
    assert code == 2 and "must give an nn.Module, got str" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-T", "0"], "temperature must be > 0, got 0.0"),
        (["-T", "-1.5"], "temperature must be > 0, got -1.5"),
        (["--alpha", "2"], r"alpha must be in [0, 1], got 2.0"),
        (["--hint", "conv9", "fc1"], "no layer named 'conv9' in the teacher"),
        (["--hint", "conv2", "fc9"], "no layer named 'fc9' in the student"),
        (["--student", "mlp31"], "unknown student model 'mlp31'"),
        (["--student", "no_such_module:f"], "cannot import module 'no_such_module'"),
        (["--teacher-weights", "x.safetensors"], "one weights file per teacher or none"),
        (["--data", "cifar"], "unknown data set 'cifar'"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, teacher_file, capsys):
    base = {"--teacher": "lenet5", "--teacher-weights": str(teacher_file), "--student": "mlp30"}
    argv = [item for key, value in base.items() if key not in args for item in (key, value)]
    if "--teacher-weights" in args:  # a second file for a single teacher
        argv += ["--teacher-weights", str(teacher_file)]
    code, _, err = run(argv + args, capsys)
    assert code == 2
    assert message in err


def test_weights_that_do_not_fit_are_refused(teacher_file, capsys):
    code, _, err = run(["--teacher", "lenet300", "--teacher-weights", str(teacher_file),
                        "--student", "mlp30"], capsys)
    assert code == 2
    assert "lenet5.safetensors' do not fit LeNet300" in err


def test_a_student_that_cannot_learn_is_refused_before_the_teacher_trains(tmp_path, monkeypatch,
                                                                        capsys):
    # Regression: without teacher weights, the teacher trained its epochs before a hint
    # layer typo, a student of other classes or an unknown soft loss was noticed.
    def trains(*_args, **_kwargs):
        raise AssertionError("a teacher trained before the student was checked")

    monkeypatch.setattr("penjing.cli.distill.fit", trains)
    (tmp_path / "distill_user_models.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["--teacher", "lenet5", "--student", "mlp30", "--hint", "conv9", "fc1"],
                       capsys)
    assert code == 2 and "no layer named 'conv9' in the teacher" in err
    code, _, err = run(["--teacher", "lenet5", "--student", "distill_user_models:five_classes"],
                       capsys)
    assert code == 2 and "teacher gives 10 logits, the student 5" in err
    with pytest.raises(ValueError, match="unknown soft loss 'l1'"):
        distill_named("lenet5", "mlp30", soft="l1")
    with pytest.raises(ValueError, match="give at least one teacher"):
        distill_named([], "mlp30")


def test_a_student_worse_than_labels_only_is_named_and_can_be_left_out(tmp_path, monkeypatch,
                                                                        capsys):
    # an untrained teacher and alpha 1: the student learns noise, the baseline the labels
    (tmp_path / "distill_user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "student.safetensors"
    args = ["--teacher", "distill_user_models:tiny", "--teacher-epochs", "0", "--student",
            "distill_user_models:tiny", "--epochs", "1", "--alpha", "1", "--out", str(out)]
    code, printed, _ = run(args, capsys, baseline=True)
    assert code == 0
    assert accuracy_printed(printed, "student") < accuracy_printed(printed, "labels only")
    assert "warning: distillation made the student worse than training on the labels" in printed
    steps = pj.core.history.steps(pj.load(out, lambda: torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 10))))
    assert [s["op"] for s in steps] == ["distill"]
    assert steps[0]["teachers"] == ["Sequential"] and steps[0]["alpha"] == 1.0
    assert steps[0]["epochs"] == 1 and steps[0]["temperature"] == 4.0
    assert main(["inspect", str(out)]) == 0
    assert "1. distilled from Sequential: 1 epochs, T 4, alpha 1, kl loss" in \
        capsys.readouterr().out
    code, printed, _ = run([*args, "--keep-better"], capsys, baseline=True)
    assert code == 0 and "(--keep-better)" in printed
    written = pj.load(out, lambda: torch.nn.Sequential(torch.nn.Flatten(),
                                                       torch.nn.Linear(784, 10)))
    assert pj.core.history.steps(written) == []  # the labels-only student, not distilled
    test = torch.utils.data.DataLoader(pj.data.mnist().test, batch_size=500)
    assert pj.train.evaluate(written, test) == pytest.approx(
        accuracy_printed(printed, "labels only"), abs=5e-5)
    code, _, err = run([*args, "--keep-better"], capsys)  # with --no-baseline
    assert code == 2 and "--keep-better compares with the student trained on the labels" in err
