"""Models and data named as 'package.module:function', resolved from the current directory."""

from __future__ import annotations

import pytest
import torch

import penjing as pj

USER_CODE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

import penjing as pj

def tiny():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))

def not_a_model():
    return "tiny"

def three_images():
    data = TensorDataset(torch.zeros(3, 1, 28, 28), torch.tensor([0, 1, 2]))
    return pj.data.DataSplit("three", data, data, num_classes=3)

NOT_CALLABLE = 7
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "spec_user_code.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_builtin_names_take_the_class_count():
    assert pj.models.build("lenet5", num_classes=7)(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_user_function_from_the_current_directory(user_dir):
    model = pj.models.build("spec_user_code:tiny", num_classes=10)  # the function fixes 3
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    split = pj.data.load("spec_user_code:three_images")
    assert split.num_classes == 3 and len(split.train) == 3


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("alexnet", ValueError, "unknown model 'alexnet'; give one of"),
        ("spec_user_code:nope", ValueError, "has no attribute 'nope'"),
        ("no_such_module_here:f", ValueError, "cannot import module 'no_such_module_here'"),
        (":tiny", ValueError, "must be 'package.module:function'"),
        ("spec_user_code:NOT_CALLABLE", TypeError, "must name a function, got int"),
        ("spec_user_code:not_a_model", TypeError, "must give an nn.Module, got str"),
    ],
)
def test_bad_model_specs(user_dir, spec, error, message):
    with pytest.raises(error, match=message):
        pj.models.build(spec)


def test_bad_data_specs(user_dir):
    with pytest.raises(TypeError, match="must give a penjing.data.DataSplit"):
        pj.data.load("spec_user_code:tiny")
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        pj.data.load("cifar")
