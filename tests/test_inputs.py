"""Inputs as a tensor, a tuple or a dict of keyword tensors, wherever penjing calls a model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import penjing as pj
from penjing import inputs
from penjing.errors import PenjingWarning
from penjing.export import compare_with_ort


class Tokens(nn.Module):
    """A toy token model whose forward takes `attention_mask` as a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        h = self.fc(self.embed(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return h


def _batch(n=2, length=6):
    ids = torch.randint(0, 50, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_dict_batch_is_keyword_inputs_not_inputs_and_labels():
    batch = _batch()
    assert inputs.from_batch(batch) is batch
    args, kwargs = inputs.split(batch)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}


def test_nested_inputs_in_a_labelled_batch():
    batch = _batch()
    pair = (batch["input_ids"], batch["attention_mask"])
    assert inputs.from_batch((pair, torch.zeros(2))) is pair


def test_mask_read_as_labels_warns():
    batch = _batch()
    with pytest.warns(PenjingWarning, match="attention mask"):
        inputs.from_batch((batch["input_ids"], batch["attention_mask"]), Tokens())


def test_bad_inputs_name_what_they_got():
    with pytest.raises(TypeError, match="got str"):
        inputs.split("text")
    with pytest.raises(TypeError, match="got int"):
        inputs.from_batch(3)


def test_calibration_passes_the_mask():
    model = Tokens().eval()
    seen = []
    q = pj.quant.prepare(model, pj.quant.int8(activation=None))
    q.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    batch = _batch()
    pj.quant.calibrate_(q, [batch])
    assert len(seen) == 1
    out = q(**batch)
    assert out[0, -1].abs().sum() == 0  # the mask reached forward


def test_export_runs_a_longer_sequence_in_ort(tmp_path):
    model = Tokens().eval()
    path = pj.export.onnx(model, tmp_path / "t.onnx", _batch(2, 6),
                          dynamic_axes={"input_ids": {1: "sequence"},
                                        "attention_mask": {1: "sequence"},
                                        "output": {1: "sequence"}})
    longer = _batch(3, 17)
    agreement = compare_with_ort(model, path, longer)
    assert agreement.max_abs < 1e-5


def test_dynamic_axes_naming_an_unknown_input_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'ids'"):
        pj.export.onnx(Tokens().eval(), tmp_path / "t.onnx", _batch(),
                       dynamic_axes={"ids": {1: "sequence"}})


def test_tuple_inputs_export_positionally(tmp_path):
    model = Tokens().eval()
    batch = _batch()
    pair = (batch["input_ids"], batch["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PenjingWarning)
        path = pj.export.onnx(model, tmp_path / "t.onnx", pair)
    assert compare_with_ort(model, path, pair).max_abs < 1e-5


class _Classifier(Tokens):
    def forward(self, input_ids, attention_mask=None):
        return {"logits": super().forward(input_ids, attention_mask).mean(1)}


def test_evaluate_scores_dict_batches_with_labels():
    model = _Classifier().eval()
    batch = _batch(4, 5)
    labels = model(**batch)["logits"].argmax(1)
    assert pj.train.evaluate(model, [{**batch, "labels": labels}]) == 1.0
    pair = (batch["input_ids"], batch["attention_mask"])
    assert pj.train.evaluate(model, [(pair, labels)]) == 1.0
    with pytest.raises(TypeError, match="'labels' entry"):
        pj.train.evaluate(model, [batch])
