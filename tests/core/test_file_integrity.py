"""Model files are verified, bounded and reproducible: the hash is mandatory, forged
quantization configs are caught even with a recomputed hash, malformed histories get
one error from pj.load and `penjing inspect` alike, pj.save is byte-deterministic, and
temp files of killed writes go on the next save or load of their folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import penjing as pj
from penjing.cli import main
from penjing.core.checkpoint import INTEGRITY_KEY, checkpoint_digest, read_checkpoint
from penjing.errors import FormatError


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def read(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def write(path, tensors: dict, meta: dict, rehash: bool = True):
    """A file as a forger writes it: the hash recomputed over the edit."""
    meta = dict(meta)
    if rehash:
        meta[INTEGRITY_KEY] = checkpoint_digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    q = pj.quant.ptq(net(), [X], pj.quant.int8())
    path = tmp_path_factory.mktemp("q") / "int8.safetensors"
    pj.save(q, path)
    return q, path


def test_the_hash_is_mandatory_in_every_file_pj_save_writes(tmp_path):
    path = tmp_path / "m.safetensors"
    pj.save(net(), path)
    tensors, meta = read(path)
    assert meta["format"] == "penjing.model/1" and INTEGRITY_KEY in meta
    # one flipped bit in the key: the file must not then load unchecked
    meta["punjing.sha256"] = meta.pop(INTEGRITY_KEY)
    tensors["0.weight"][0, 0] += 1
    write(tmp_path / "flip.safetensors", tensors, meta, rehash=False)
    with pytest.raises(FormatError, match=r"must carry 'penjing.sha256'.*'punjing.sha256'"):
        pj.load(tmp_path / "flip.safetensors", net)
    # a plain checkpoint (hash only) whose hash key is damaged is refused too
    pj.train.save_checkpoint(net(), tmp_path / "c.safetensors")
    tensors, meta = read(tmp_path / "c.safetensors")
    write(tmp_path / "c2.safetensors", tensors, {"penjing.sha257": meta[INTEGRITY_KEY]},
          rehash=False)
    with pytest.raises(FormatError, match="'penjing.sha257'"):
        read_checkpoint(tmp_path / "c2.safetensors")
    # another tool's plain safetensors (no penjing metadata) still loads
    save_file(net().state_dict(), str(tmp_path / "plain.safetensors"))
    assert pj.load(tmp_path / "plain.safetensors", net)(X).shape == (16, 3)


def test_forged_weight_bits_are_refused_though_the_hash_is_recomputed(int8, tmp_path):
    _, path = int8
    tensors, meta = read(path)
    steps = json.loads(meta["penjing.history"])
    steps[-1]["config"]["weight"]["bits"] = 7
    meta["penjing.history"] = json.dumps(steps)
    write(tmp_path / "w7.safetensors", tensors, meta)
    with pytest.raises(FormatError, match=r"holds values in \[-\d+, \d+\], outside \[-64, 63\] "
                                          r"of its config's 7-bit signed integers"):
        pj.load(tmp_path / "w7.safetensors", net)


def test_forged_activation_bits_are_refused(int8, tmp_path):
    q, path = int8
    tensors, meta = read(path)
    zero = [v for k, v in tensors.items() if k.endswith("_quant.zero_point")]
    assert any(int(v.max()) > 15 for v in zero), "the test needs a zero point above 15"
    steps = json.loads(meta["penjing.history"])
    steps[-1]["config"]["activation"]["bits"] = 4
    meta["penjing.history"] = json.dumps(steps)
    write(tmp_path / "a4.safetensors", tensors, meta)
    with pytest.raises(FormatError, match=r"zero points in \[\d+, \d+\], outside \[0, 15\]"):
        pj.load(tmp_path / "a4.safetensors", net)
    # the honest file loads and computes what the quantized model does
    assert torch.equal(pj.load(path, net)(X), q(X))


@pytest.mark.parametrize("step, expected", [
    ({"op": "quantize", "config": None}, "step 1 (quantize).config must be an object"),
    ({"op": "compact", "layers": {"conv1": {}}}, "step 1 (compact).layers.conv1 must be a "
     "list of 2"),
    ({"op": "channels", "changes": [["0", "weight", 0, [-1]]]}, "changes[0][3][0] must be a "
     "non-negative integer"),
    ({"op": "heads"}, "step 1 (heads) has no 'layers'"),
])
def test_malformed_history_gets_one_error_from_load_and_inspect(tmp_path, capsys, step,
                                                                 expected):
    pj.save(net(), tmp_path / "m.safetensors")
    tensors, meta = read(tmp_path / "m.safetensors")
    meta["penjing.history"] = json.dumps([step])
    path = write(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(FormatError, match="history cannot be read") as info:
        pj.load(path, net)
    assert expected in str(info.value)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_deeply_nested_history_is_refused_without_recursion(tmp_path, capsys):
    pj.save(net(), tmp_path / "m.safetensors")
    tensors, meta = read(tmp_path / "m.safetensors")
    meta["penjing.history"] = "[" * 2000 + "]" * 2000
    path = write(tmp_path / "deep.safetensors", tensors, meta)
    assert main(["inspect", str(path)]) == 2
    assert "nests 2000 levels deep, more than 16" in capsys.readouterr().err
    with pytest.raises(FormatError, match="nests 2000 levels deep"):
        pj.load(path, net)


def test_inspect_prints_a_valid_history(int8, capsys):
    assert main(["inspect", str(int8[1])]) == 0
    out = capsys.readouterr().out
    assert "1. quantized: weights 8 bits (channel), activations 8 bits" in out


def test_inspect_checks_the_checksums_of_a_pjz(tmp_path, capsys):
    path = tmp_path / "m.pjz"
    pj.codec.save(net(), path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # the data section, not the manifest
    path.write_bytes(bytes(data))
    assert main(["inspect", str(path)]) == 2
    assert "fails its CRC32 check" in capsys.readouterr().err
    assert len(pj.codec.inspect(path, verify=False).layers) == 4  # the cheap table


def test_codes_are_not_widened_before_the_shape_check(tmp_path):
    model = net()
    pj.quant.kmeans_(model, bits=2)
    path = tmp_path / "shared.safetensors"
    pj.save(model, path)
    tensors, meta = read(path)
    key = next(k for k in tensors if k.endswith(".codes"))
    tensors[key] = torch.zeros(4_000_000, dtype=torch.uint8)  # 4 MB here, 32 MB as int64
    write(tmp_path / "big.safetensors", tensors, meta)
    widened = []
    real_long = torch.Tensor.long

    def spy(self, *args, **kwargs):
        widened.append(self.numel())
        return real_long(self, *args, **kwargs)

    torch.Tensor.long = spy
    try:
        with pytest.raises(FormatError, match=f"{key} is 4000000 in the file"):
            pj.load(tmp_path / "big.safetensors", net)
    finally:
        torch.Tensor.long = real_long
    assert 4_000_000 not in widened


_SAVE = """
import hashlib, sys, torch
import penjing as pj
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
m = pj.quant.ptq(m, [torch.randn(16, 6)], pj.quant.int8())
for i in range(3):
    pj.save(m, sys.argv[1], metadata={"model": "x", "recipe": "r", "stage": "1"})
    print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())
"""


def test_pj_save_is_byte_deterministic_across_saves_and_processes(tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="random")
    out = subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / "a.safetensors")],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    m = pj.quant.ptq(m, [torch.randn(16, 6)], pj.quant.int8())
    here = set()
    for _ in range(3):
        pj.save(m, tmp_path / "b.safetensors", metadata={"model": "x", "recipe": "r",
                                                           "stage": "1"})
        here.add(hashlib.sha256((tmp_path / "b.safetensors").read_bytes()).hexdigest())
    assert len(out) == 3 and set(out) == here, (out, here)


def test_a_load_removes_temps_that_killed_writes_left_in_its_folder(tmp_path):
    pj.save(net(), tmp_path / "m.safetensors")
    pj.codec.save(net(), tmp_path / "m.pjz")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for target in ("m.safetensors", "m.pjz"):
        temp = tmp_path / f".{target}.penjing-{dead}-0badc0de.tmp"
        temp.write_bytes(b"half a model")
        pj.load(tmp_path / target, net)
        assert not temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pjz", "m.safetensors"]


def test_a_pickle_is_refused_in_one_whole_sentence_that_names_the_risk(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("pickle ran",))

    torch.save({"model": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError) as info:
        pj.load(tmp_path / "evil.pt", net)
    msg = str(info.value)
    assert "Unsupported global: GLOBAL print was not an allowed global by default" in msg
    assert "can run code from the file, so penjing does not" in msg
    assert "\x1b[" not in msg and msg.endswith("convert the file to safetensors")


def test_a_torchscript_archive_is_refused_without_torch_warnings(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own
        torch.jit.script(nn.Linear(6, 8)).save(str(tmp_path / "ts.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FormatError, match=r"it is a TorchScript archive \(torch.jit.save\)"):
            pj.load(tmp_path / "ts.pt", net)
    assert [str(w.message) for w in caught] == []


def test_a_pruned_file_from_before_the_hash_still_loads_but_not_a_damaged_new_one(tmp_path):
    from penjing.prune.structural.surgery import Change

    model = net()
    changes = [Change("0", "weight", 0, (0, 2, 3)), Change("0", "bias", 0, (0, 2, 3)),
               Change("2", "weight", 1, (0, 2, 3))]
    pj.prune.apply_(model, changes)
    pj.prune.save_pruned(model, changes, tmp_path / "new.safetensors")
    tensors, meta = read(tmp_path / "new.safetensors")
    old = {"penjing.prune.changes": meta["penjing.prune.changes"]}
    write(tmp_path / "old.safetensors", tensors, old, rehash=False)
    assert torch.equal(pj.prune.load_pruned(net(), tmp_path / "old.safetensors")(X), model(X))
    write(tmp_path / "flip.safetensors", tensors,
          {**old, "penjing.sha2f6": meta[INTEGRITY_KEY]}, rehash=False)
    with pytest.raises(FormatError, match="'penjing.sha2f6'"):
        pj.prune.load_pruned(net(), tmp_path / "flip.safetensors")
