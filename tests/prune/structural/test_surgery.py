"""Pruned checkpoints: edited change lists are FormatErrors that leave the model as it was,
and the integrity hash covers the change list as well as the weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import penjing as pj
from penjing.core.checkpoint import INTEGRITY_KEY, checkpoint_digest
from penjing.core.model_file import PRUNED_KEY
from penjing.errors import FormatError
from penjing.prune.structural.structured import channels_


@pytest.fixture
def pruned(tmp_path):
    model = pj.models.create("lenet5").eval()
    changes = channels_(model, torch.randn(1, 1, 28, 28), ratio=0.5)
    path = tmp_path / "small.safetensors"
    pj.prune.save_pruned(model, changes, path)
    return model, path


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _write(path, tensors, metadata, rehash=True):
    if rehash:
        metadata[INTEGRITY_KEY] = checkpoint_digest(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


EDITS = {
    "unknown module": lambda rows: rows.append(["nope", "weight", 0, [0]]),
    "index past the size": lambda rows: rows[0][3].append(10_000),
    "dim past the tensor": lambda rows: rows[0].__setitem__(2, 7),
    "negative index": lambda rows: rows[0][3].__setitem__(0, -1),
    "repeated index": lambda rows: rows[0][3].__setitem__(1, rows[0][3][0]),
    "unknown tensor": lambda rows: rows[0].__setitem__(1, "gamma"),
    "bool dim": lambda rows: rows[0].__setitem__(2, True),
    "fewer kept than weights": lambda rows: rows[0].__setitem__(3, rows[0][3][:-1]),
    "string index": lambda rows: rows[0].__setitem__(3, ["0"]),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_an_edited_change_list_is_a_format_error_and_leaves_the_model(pruned, tmp_path, edit):
    _, path = pruned
    tensors, metadata = _read(path)
    rows = json.loads(metadata[PRUNED_KEY])
    EDITS[edit](rows)
    metadata[PRUNED_KEY] = json.dumps(rows)
    bad = _write(tmp_path / "bad.safetensors", tensors, metadata)
    fresh = pj.models.create("lenet5")
    before = _snapshot(fresh)
    with pytest.raises(FormatError, match="bad.safetensors"):
        pj.prune.load_pruned(fresh, bad)
    after = fresh.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert fresh.conv1.out_channels == 20


def test_the_hash_covers_the_change_list(pruned, tmp_path):
    model, path = pruned
    tensors, metadata = _read(path)
    rows = json.loads(metadata[PRUNED_KEY])
    rows[0][3] = rows[0][3][:-1]
    metadata[PRUNED_KEY] = json.dumps(rows)
    bad = _write(tmp_path / "edited.safetensors", tensors, metadata, rehash=False)
    with pytest.raises(FormatError, match="do not match their SHA-256"):
        pj.prune.load_pruned(pj.models.create("lenet5"), bad)


def test_a_file_without_the_hash_still_loads(pruned, tmp_path):
    model, path = pruned
    tensors, metadata = _read(path)
    del metadata[INTEGRITY_KEY]
    old = _write(tmp_path / "old.safetensors", tensors, metadata, rehash=False)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(pj.prune.load_pruned(pj.models.create("lenet5"), old).eval()(x), model(x))


def test_deep_or_huge_json_is_a_format_error(pruned, tmp_path):
    _, path = pruned
    tensors, metadata = _read(path)
    for meta, match in (("[" * 50000 + "]" * 50000, "nests 50000 levels"),
                        ('[["conv1", "weight", 1' + "0" * 5000 + ", [0]]]", "5001 digits")):
        metadata[PRUNED_KEY] = meta
        bad = _write(tmp_path / "deep.safetensors", tensors, metadata)
        with pytest.raises(FormatError, match=match):
            pj.prune.load_pruned(pj.models.create("lenet5"), bad)


def test_weights_of_another_model_are_one_line(pruned, tmp_path):
    _, path = pruned
    with pytest.raises(FormatError, match="does not apply to this LeNet300") as info:
        pj.prune.load_pruned(pj.models.create("lenet300"), path)
    assert "\n" not in str(info.value)
    pj.train.save_checkpoint(pj.models.create("lenet5"), tmp_path / "plain.safetensors")
    other = pj.models.create("lenet300")
    before = _snapshot(other)
    with pytest.raises(FormatError, match=r"do not fit LeNet300: tensors 2 missing \(fc3.weight, "
                       r"fc3.bias\); 4 unexpected .* 4 of another shape \(fc1.weight is "
                       r"500x800 in the file but 300x784 here") as info:
        pj.train.load_checkpoint(tmp_path / "plain.safetensors", other)
    assert "\n" not in str(info.value)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
