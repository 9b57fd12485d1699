from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import penjing as pj
from penjing import distributed
from penjing.distributed import _EveryNth


def test_one_process_is_a_no_op(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched() and not distributed.init() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    loader = [(torch.zeros(2, 3), torch.zeros(2))]
    assert distributed.shard(loader) is loader
    assert distributed.all_reduce(2.5) == 2.5
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    grad = model.weight.grad.clone()
    assert distributed.all_reduce_grads_(model.parameters()) == 2
    assert torch.equal(model.weight.grad, grad)
    assert distributed.broadcast_(model) == 0
    assert distributed.main_only(lambda x: x + 1)(1) == 2


def test_bad_reduction_and_missing_backend_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="unknown reduction 'avg'; choose one of"):
        distributed.all_reduce(1.0, "avg")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="lacks; pass init\\(backend='gloo'\\)"):
        distributed.init(backend="nosuchbackend")
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK must be a non-negative integer, got 'zero'"):
        distributed.init()


def test_every_nth_batch_keeps_ranks_in_step():
    batches = list(range(7))
    even = [list(_EveryNth(batches, r, 3, even=True)) for r in range(3)]
    assert even == [[0, 3], [1, 4], [2, 5]]  # batch 6 has no round of its own: dropped
    assert [len(_EveryNth(batches, r, 3, even=True)) for r in range(3)] == [2, 2, 2]
    exact = [list(_EveryNth(batches, r, 3, even=False)) for r in range(3)]
    assert exact == [[0, 3, 6], [1, 4], [2, 5]]  # evaluation: every batch once
    assert [len(_EveryNth(batches, r, 3, even=False)) for r in range(3)] == [3, 2, 2]


SCRIPT = """
import hashlib, json, sys
from pathlib import Path

import torch
import penjing as pj
from penjing import distributed
from penjing.quant import activation_quantizers

def digest(model):
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

assert distributed.init() and distributed.world_size() == 2
rank, out = distributed.rank(), Path(sys.argv[1])
split = pj.data.digits()
# each rank shuffles its own way: fit must still give every rank its own share
train, test = pj.data.loaders(split, batch_size=32, seed=rank)
torch.manual_seed(rank)  # ranks start from different weights: fit starts from rank 0's
model = pj.models.create("lenet300", in_features=64)
pj.prune.magnitude_(model, sparsity=0.8)
history = pj.train.fit(model, train, epochs=3, test_loader=test, progress=False)
masks = {k: v for k, v in pj.prune.masks(model).items()}
zeros_kept = all(bool((model.get_submodule(k).weight[m == 0] == 0).all())
                 for k, m in masks.items())
pj.distributed.main_only(pj.train.save_checkpoint)(model, out / f"pruned-{rank}.safetensors")
batches = [(x, y) for x, y in test]
local_acc = pj.train.evaluate(model, batches, shard=False)

student = pj.models.create("lenet300", in_features=64)  # differs by rank, as above
kd = pj.distill.distill_(model, student, train, epochs=2, progress=False)

q = pj.quant.qat(model, train, pj.quant.int8(observer="percentile"), epochs=2, lr=1e-4,
                 calib_batches=4, progress=False)
ranges = [[float(v) for v in (*m.observer.range(), m.scale, m.zero_point)]
          for m in activation_quantizers(q).values()]
print(json.dumps({
    "rank": rank, "pruned": digest(model), "qat": digest(q), "loss": history.loss,
    "accuracy": history.accuracy, "zeros_kept": zeros_kept,
    "sparsity": float(sum((m == 0).sum() for m in masks.values()) /
                      sum(m.numel() for m in masks.values())),
    "global_acc": pj.train.evaluate(model, batches), "local_acc": local_acc,
    "ranges": ranges, "student": digest(student), "kd_loss": kd.loss,
    "qat_acc": pj.train.evaluate(q, test),
}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, nproc: int, tmp_path, timeout: float = 240) -> list[dict]:
    """Run `script` as torchrun would: `nproc` processes, RANK/WORLD_SIZE/LOCAL_RANK set."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(path), str(tmp_path)],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(nproc)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return sorted(results, key=lambda r: r["rank"])


@pytest.mark.slow
def test_two_processes_end_identical_and_learn(tmp_path):
    r0, r1 = launch(SCRIPT, 2, tmp_path)
    assert r0["pruned"] == r1["pruned"]  # weights, masks: bit for bit
    assert r0["qat"] == r1["qat"]  # weights, quantizer scales and zero points
    assert r0["ranges"] == r1["ranges"]  # merged observers: one range on every rank
    assert r0["loss"] == r1["loss"] and r0["loss"][-1] < r0["loss"][0]
    assert r0["accuracy"] == r1["accuracy"] and r0["accuracy"][-1] > 0.8
    assert r0["student"] == r1["student"]  # distillation trains through fit too
    assert r0["kd_loss"] == r1["kd_loss"] and r0["kd_loss"][-1] < r0["kd_loss"][0]
    assert r0["zeros_kept"] and r1["zeros_kept"]
    assert r0["sparsity"] == pytest.approx(0.8, abs=1e-3)
    # evaluate sums each rank's counts: the accuracy over the whole test set
    assert r0["global_acc"] == r1["global_acc"] == r0["local_acc"] == r1["local_acc"]
    assert r0["qat_acc"] == r1["qat_acc"] > 0.8
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors")
    assert files == ["pruned-0.safetensors"]  # only rank 0 writes
    saved = pj.train.load_checkpoint(tmp_path / files[0])
    assert any(k.endswith("mask") for k in saved)


# `penjing` under torchrun: each rank counts its destroy_process_group calls (printed by an
# exit handler registered first, so it runs after penjing's own) and says when it joined
CLI = """
import atexit, json, sys
import torch.distributed as dist
calls = []
real = dist.destroy_process_group
def counted(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
dist.destroy_process_group = counted
atexit.register(lambda: print(json.dumps({"destroyed": len(calls)}), flush=True))
from penjing import distributed
from penjing.cli import main
joined = distributed.init
def init(*args, **kwargs):
    first = not dist.is_initialized()
    spread = joined(*args, **kwargs)
    if first:
        print("joined", flush=True)
    return spread
distributed.init = init
sys.exit(main(sys.argv[2:]))
"""


def launch_cli(args: list[str], tmp_path, interrupt_after: float | None = None,
               timeout: float = 240) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each of two ranks running `penjing ARGS`; with
    `interrupt_after`, both get SIGINT that many seconds after both joined the group."""
    import signal
    import time

    path = tmp_path / "cli.py"
    path.write_text(textwrap.dedent(CLI))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(path), str(tmp_path), *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        if interrupt_after is not None:
            for p in procs:  # reading stdout up to 'joined' never blocks the peer
                line = p.stdout.readline()
                assert line.strip() == "joined", line + p.stderr.read()[-2000:]
            time.sleep(interrupt_after)
            for p in procs:
                p.send_signal(signal.SIGINT)
        done = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *outs) for p, outs in zip(procs, done, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def destroyed(out: str) -> int:
    return json.loads(out.strip().splitlines()[-1])["destroyed"]


TRAIN = ["train", "lenet300", "--data", "mnist", "--quiet"]


@pytest.mark.slow
def test_a_cli_run_that_ends_well_leaves_the_group_once_on_every_rank(tmp_path):
    ranks = launch_cli([*TRAIN, "--epochs", "1", "--out", str(tmp_path / "m.safetensors")],
                       tmp_path)
    for code, out, err in ranks:
        assert code == 0, err[-3000:]
        assert destroyed(out) == 1
        assert "terminate called" not in err


@pytest.mark.slow
def test_a_cli_run_that_fails_after_joining_leaves_the_group_once(tmp_path):
    ranks = launch_cli([*TRAIN, "--epochs", "1", "--lr", "-1",
                        "--out", str(tmp_path / "m.safetensors")], tmp_path)
    for code, out, err in ranks:
        assert code == 2, err[-3000:]
        assert "joined" in out and destroyed(out) == 1
        assert err.strip().splitlines() == [
            "penjing train: error: Invalid learning rate: -1.0"], err[-3000:]


@pytest.mark.slow
def test_ctrl_c_in_training_is_one_line_and_exit_130_on_every_rank(tmp_path):
    ranks = launch_cli([*TRAIN, "--epochs", "500", "--out", str(tmp_path / "m.safetensors")],
                       tmp_path, interrupt_after=2.0)
    for code, out, err in ranks:
        assert code == 130, err[-3000:]
        assert destroyed(out) == 1
        assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err[-3000:]
    assert not (tmp_path / "m.safetensors").exists()
