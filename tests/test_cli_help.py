"""`penjing -h` and `--version` answer without PyTorch; Ctrl-C is one line and exit 130 at
any moment of a verb, PyTorch's import and the cleanup after a first Ctrl-C included."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import penjing
from penjing.cli import SUMMARIES, build_parser, main

SRC = str(Path(penjing.__file__).resolve().parent.parent)
ENV = {**os.environ, "PYTHONPATH": SRC}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                          text=True, timeout=60)


def test_help_and_version_do_not_import_torch():
    done = _python(
        "import sys\nfrom penjing.cli import main\n"
        "for argv in (['-h'], ['--version']):\n"
        "    try:\n        main(argv)\n    except SystemExit as stop:\n"
        "        assert stop.code == 0, stop.code\n"
        "print('torch' in sys.modules, 'penjing.cli.prune' in sys.modules)\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "False False"
    assert f"penjing {penjing.__version__}" in lines
    assert any(line.strip().startswith("prune ") for line in lines)  # every verb is listed


def test_the_quick_listing_says_what_each_verb_says_of_itself():
    (commands,) = [a for a in build_parser()._actions if a.dest == "command"]
    summaries = {a.dest: a.help for a in commands._choices_actions}
    assert summaries == SUMMARIES


def test_a_verbs_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "-h"])
    assert stop.value.code == 0
    assert "--epochs" in capsys.readouterr().out


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_ctrl_c_while_a_verb_imports_is_one_line(monkeypatch, capsys):
    import importlib

    def interrupted(name, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["train", "lenet5", "--out", "x.safetensors"]) == 130
    assert _one_line(capsys).startswith("penjing train: interrupted; no partial output")


def test_a_second_ctrl_c_does_not_break_the_cleanup(monkeypatch, capsys):
    cleaned = []

    def slow_inspect(path):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler interrupts this
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while cleaning up
            time.sleep(0.05)
            cleaned.append(path)

    monkeypatch.setattr(penjing.codec, "inspect", slow_inspect)
    before = signal.getsignal(signal.SIGINT)
    start = time.perf_counter()
    assert main(["inspect", "x.pjz"]) == 130
    assert time.perf_counter() - start < 4 and cleaned == ["x.pjz"]
    assert "penjing inspect: interrupted" in _one_line(capsys)
    assert signal.getsignal(signal.SIGINT) is before  # called with argv: handlers restored


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_ctrl_c_while_torch_imports_is_one_line_and_130(tmp_path):
    command = [sys.executable, "-m", "penjing", "train", "lenet5", "--out",
               str(tmp_path / "m.safetensors"), "--quiet"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if "torch" in maps.read_text():  # PyTorch's libraries are loading
                break
        except OSError:
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("penjing train: interrupted; no partial output was written")
    assert not (tmp_path / "m.safetensors").exists()


def _parsers(parser: argparse.ArgumentParser, prog: str = "penjing"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_every_option_says_what_it_does_and_its_default_once():
    from penjing.cli.common import HelpFormatter

    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = f"{prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help or not action.option_strings, f"{name} has no help text"
            shown = HelpFormatter(prog)._get_help_string(action)
            assert shown.replace("%(default)s", "").count("default") <= 1, f"{name}: {shown!r}"
            assert "(default: None)" not in shown and "(default: False)" not in shown, name
    text = build_parser(["prune"])._actions[-1].choices["prune"].format_help()
    assert "(default 0.5)" in text and "(default: 0)" in text  # --ratio, --epochs


def test_prune_batch_size_is_the_training_batch_as_everywhere(capsys):
    assert main(["prune", "lenet300", "--data", "none", "--input-shape", "3,1,28,28",
                 "--batch-size", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "latency ms, batch 3" in out
    assert "batch size 8 was not used: it is the fine-tuning batch" in out
    assert main(["prune", "lenet300", "--data", "none", "--latency-batch", "2",
                 "--input-shape", "2,1,28,28", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "latency ms, batch 2" in out and "was not used" not in out


TINY_DATA = """
import torch
from torch.utils.data import TensorDataset
from penjing.data import DataSplit

def tiny():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(192, 1, 28, 28, generator=g), torch.randint(0, 10, (192,), generator=g)
    return DataSplit("tiny", TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:]), 10)
"""


def test_train_into_a_pipe_prints_before_and_after_and_the_epoch_cap(tmp_path):
    (tmp_path / "tiny_data.py").write_text(TINY_DATA)
    done = subprocess.run(
        [sys.executable, "-m", "penjing", "train", "lenet300", "--data", "tiny_data:tiny",
         "--epochs", "3", "--out", str(tmp_path / "m.safetensors")],
        env={**ENV, "PYTHONPATH": f"{SRC}:{tmp_path}", "PENJING_EPOCHS": "1"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr + done.stdout and "it/s" not in done.stderr  # no bars
    assert done.stderr == "note: PENJING_EPOCHS=1 lowers --epochs 3 to 1\n"
    found = re.search(r"1 epoch, test accuracy ([\d.]+)% before, ([\d.]+)% \(([+-][\d.]+) "
                      r"points\) after", done.stdout)
    before, after, change = map(float, found.groups())
    assert change == pytest.approx(after - before, abs=0.011)
