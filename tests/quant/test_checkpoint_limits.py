"""Quantized checkpoints: the SHA-256 covers the config, and every edited file is a
FormatError that leaves the float model unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import penjing as pj
from penjing.core.checkpoint import INTEGRITY_KEY, checkpoint_digest
from penjing.errors import FormatError
from penjing.quant import ptq, save_quantized
from penjing.quant.linear.checkpoint import _digest, load_quantized
from penjing.quant.linear.config import make_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    config = make_config(bits=8, granularity="channel", act_bits=8)
    q = ptq(pj.models.create("lenet5").eval(), [torch.randn(8, 1, 28, 28)], config)
    path = tmp_path_factory.mktemp("q") / "q.safetensors"
    save_quantized(q, config, path)
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    return q, path, tensors, metadata


def _write(path, tensors, metadata, rehash=True):
    metadata = dict(metadata)
    if rehash:
        metadata[INTEGRITY_KEY] = checkpoint_digest(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_editing_the_bits_is_caught_by_the_hash(saved, tmp_path):
    _, _, tensors, metadata = saved
    assert metadata["format"] == "penjing.quantized/3"
    config = json.loads(metadata["config"])
    config["weight"]["bits"] = 7
    edited = dict(metadata, config=json.dumps(config))
    path = _write(tmp_path / "b.safetensors", tensors, edited, rehash=False)
    with pytest.raises(FormatError, match="do not match their SHA-256"):
        load_quantized(pj.models.create("lenet5"), path)
    del edited[INTEGRITY_KEY]
    path = _write(tmp_path / "c.safetensors", tensors, edited, rehash=False)
    with pytest.raises(FormatError, match="must carry 'penjing.sha256'"):
        load_quantized(pj.models.create("lenet5"), path)


def test_a_format_2_file_with_its_tensor_hash_still_loads(saved, tmp_path):
    q, _, tensors, metadata = saved
    old = {"format": "penjing.quantized/2", "config": metadata["config"],
           "sha256": _digest(tensors)}
    path = _write(tmp_path / "v2.safetensors", tensors, old, rehash=False)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(load_quantized(pj.models.create("lenet5"), path)(x), q(x))


def test_symmetric_weight_zero_points_are_implied_and_old_files_that_store_them_load(
        saved, tmp_path):
    q, _, tensors, metadata = saved
    assert not [k for k in tensors if k.endswith("weight.0.zero_point")]
    scales = [k for k in tensors if k.endswith("weight.0.scale")]
    assert scales
    older = dict(tensors)
    for key in scales:  # what files written before stored: a zero per scale
        older[key.replace(".scale", ".zero_point")] = torch.zeros(tensors[key].shape,
                                                                  dtype=torch.int32)
    path = _write(tmp_path / "old.safetensors", older, dict(metadata))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(load_quantized(pj.models.create("lenet5"), path)(x), q(x))
    nonzero = dict(older)
    nonzero[scales[0].replace(".scale", ".zero_point")] = torch.ones(
        tensors[scales[0]].shape, dtype=torch.int32)
    path = _write(tmp_path / "shifted.safetensors", nonzero, dict(metadata))
    assert not torch.equal(load_quantized(pj.models.create("lenet5"), path)(x), q(x))


def _config_edit(edit):
    def apply(tensors, metadata):
        config = json.loads(metadata["config"])
        edit(config)
        metadata["config"] = json.dumps(config)
    return apply


EDITS = {
    "granularity kind": _config_edit(lambda c: c["weight"]["granularity"].update(kind="x")),
    "bits 99": _config_edit(lambda c: c["weight"].update(bits=99)),
    "bits a string": _config_edit(lambda c: c["weight"].update(bits="8")),
    "axis 9": _config_edit(lambda c: c["weight"]["granularity"].update(axis=9)),
    "no granularity": _config_edit(lambda c: c["weight"].pop("granularity")),
    "layers a list": _config_edit(lambda c: c.update(layers=[1])),
    "types unknown": _config_edit(lambda c: c.update(types=["os:system"])),
    "config a number": lambda t, m: m.update(config="7"),
    "deep config": lambda t, m: m.update(config="[" * 10000 + "]" * 10000),
    "scale too long": lambda t, m: t.update({
        k: torch.ones(10**5) for k in t if k.endswith("0.scale")}),
    "ints as floats": lambda t, m: t.update({
        k: t[k].float() for k in t if k.endswith(".int")}),
    "act scale missing": lambda t, m: [t.pop(k) for k in list(t) if k.endswith("quant.scale")],
    "zero point missing": lambda t, m: [t.pop(k) for k in list(t)
                                        if k.endswith("quant.zero_point")][:1],
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_an_edited_file_is_a_format_error_and_leaves_the_model(saved, tmp_path, edit):
    _, _, tensors, metadata = saved
    tensors, metadata = dict(tensors), dict(metadata)
    EDITS[edit](tensors, metadata)
    path = _write(tmp_path / "e.safetensors", tensors, metadata)
    fresh = pj.models.create("lenet5")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(FormatError, match="e.safetensors"):
        load_quantized(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert list(fresh.state_dict()) == list(before)
