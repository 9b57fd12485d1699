"""Every error and Ctrl-C is one line on stderr naming the file or option, with the exit
codes `penjing --help` documents."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest
import torch

import penjing as pj
import penjing.codec
from penjing.cli import EXIT_CODES, _terminate, build_parser, main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_help_lists_the_exit_codes():
    text = build_parser().format_help()
    assert "exit codes:" in text and "130  interrupted" in text
    assert EXIT_CODES.splitlines()[0] in text


def test_a_folder_given_as_weights_is_called_a_folder(tmp_path, capsys):
    assert main(["prune", "lenet5", "--weights", str(tmp_path), "--data", "none",
                 "--input-shape", "1,1,28,28", "--quiet"]) == 2
    err = _one_line(capsys)
    assert f"'{tmp_path}' is a folder" in err and "does not exist" not in err


def test_a_bad_input_shape_names_the_option(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["prune", "lenet5", "--input-shape", "abc"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --input-shape: expected comma-separated positive ints" in err
    assert "invalid literal" not in err


def test_an_output_that_cannot_be_written_fails_before_the_work(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["prune", "lenet5", "--data", "none", "--input-shape", "1,1,28,28",
                 "--quiet", "--out", str(tmp_path)]) == 2
    assert f"--out '{tmp_path}' is a folder; give a file name inside it" in _one_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["quantize", "lenet5", "--weights", "w.safetensors",
                 "--onnx", str(tmp_path / "file" / "m.onnx")]) == 2
    assert "is a file, not a folder" in _one_line(capsys)
    assert time.perf_counter() - start < 2


def test_a_full_disk_names_the_target_not_the_temp(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "m.pjz"
    with pytest.raises(OSError, match=f"cannot write '{target}': no space left on the device"):
        penjing.codec.save({"w": torch.ones(3)}, target)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(penjing.codec, "inspect", interrupted)
    assert main(["inspect", "x.pjz"]) == 130
    assert "penjing inspect: interrupted" in _one_line(capsys)


def test_an_unexpected_exception_is_one_line_and_exit_1(monkeypatch, capsys):
    def broken(path):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(penjing.codec, "inspect", broken)
    assert main(["inspect", "x.pjz"]) == 1
    assert "internal error: ZeroDivisionError: division by zero" in _one_line(capsys)


def test_a_hostile_pjz_is_one_line(tmp_path, capsys):
    import json
    import struct
    import zlib

    path = tmp_path / "m.pjz"
    pj.codec.save({"w": torch.zeros(10)}, path)
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data, 8)
    manifest = zlib.decompress(data[20 : 20 + length]).decode()
    manifest = manifest.replace('"shape":[10]', '"shape":[1' + "0" * 5000 + "]")
    assert json.loads(manifest.replace("1" + "0" * 5000, "1"))
    blob = zlib.compress(manifest.encode())
    path.write_bytes(struct.pack("<4sHHQI", b"PJZ\x00", 1, 0, len(blob), zlib.crc32(blob))
                     + blob + data[20 + length :])
    assert main(["inspect", str(path)]) == 2
    assert "integer of 5001 digits" in _one_line(capsys)


def test_sigterm_during_a_save_exits_143_and_leaves_no_temp(tmp_path, monkeypatch):
    # the CLI's SIGTERM handler unwinds like Ctrl-C, so the atomic write removes its temp
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        monkeypatch.setattr(os, "fsync", lambda fd: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(SystemExit) as stop:
            pj.codec.save({"w": torch.ones(3)}, tmp_path / "x.pjz")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 143
    assert list(tmp_path.iterdir()) == []


def test_a_users_function_that_raises_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_user_code.py").write_text(
        "def net():\n    raise KeyError('layer4')\n"
        "def data():\n    return 1 / 0\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "broken_user_code:net", "--data", "none",
                 "--input-shape", "1,1,8,8", "--quiet"]) == 2
    err = _one_line(capsys)
    assert "model 'broken_user_code:net' raised KeyError: 'layer4'" in err
    assert main(["train", "lenet5", "--data", "broken_user_code:data", "--out",
                 str(tmp_path / "m.safetensors"), "--quiet"]) == 2
    assert "data 'broken_user_code:data' raised ZeroDivisionError" in _one_line(capsys)


def test_a_bad_recipe_lists_every_problem_with_its_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet5\ndata: mnist\nstages:\n"
                      "  - stage: prune\n    ratio: 1.5\n"
                      "  - stage: shrink\n")
    assert main(["compress", str(recipe), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 2 and all(line.startswith("penjing compress: error:") for line in err)
    assert any("line 5" in line and "ratio" in line for line in err), err
    assert any("shrink" in line for line in err), err
    assert not (tmp_path / "out").exists()
