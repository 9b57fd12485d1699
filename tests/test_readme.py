"""The README's Python examples run as written, in order, in a scratch folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from penjing.core import steps

README = Path(__file__).resolve().parent.parent / "README.md"


def _capped(fn, cap: int):
    """`fn` with its `epochs` argument lowered to at most `cap`."""
    def wrapper(*args, epochs, **kwargs):
        return fn(*args, epochs=min(epochs, cap), **kwargs)
    return wrapper


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    """The Python blocks in order, with fewer epochs (as the shell block runs with
    PENJING_EPOCHS=1): fit at most 2, distillation 1. The figures the first block prints
    still hold (90.9 % with this cap, 87.7 % with 1 epoch)."""
    import penjing as pj

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pj.train, "fit", _capped(pj.train.fit, 2))
    monkeypatch.setattr(pj.distill, "distill_", _capped(pj.distill.distill_, 1))
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our README
    finally:
        steps.unregister("widen")  # the README's own step leaves the registry as it was
    assert (tmp_path / "widened.safetensors").is_file()
    printed = capsys.readouterr().out
    ratio, accuracy = re.search(r"(\d+)x smaller, accuracy ([\d.]+)%", printed).groups()
    assert int(ratio) >= 20 and float(accuracy) > 85
    assert (tmp_path / "model.pjz").stat().st_size < 60_000
    onnx = (tmp_path / "vgg-int8.onnx").read_bytes()
    assert b"QuantizeLinear" in onnx and b"DequantizeLinear" in onnx


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """The shell block under "On the command line", run by bash line by line as a user
    would, in a scratch folder beside the repository's examples and .venv."""
    import os
    import subprocess
    import sys

    text = README.read_text()
    block = re.search(r"## On the command line.*?```sh\n(.*?)```", text, re.S).group(1)
    assert "source .venv/bin/activate" in block and "penjing compress" in block
    root = README.parent
    (tmp_path / "examples").symlink_to(root / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the environment running the tests
    env = {**os.environ, "PENJING_EPOCHS": "1"}
    done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    # each step read the file the one before it wrote, and said what it measured
    assert "model written to runs/cli/lenet5.safetensors" in out
    assert "pruned model written to runs/cli/pruned.safetensors" in out
    assert "labels only" in out and "student written to runs/cli/student.safetensors" in out
    assert "quantized model written to runs/cli/int8.safetensors" in out
    assert "ONNX Runtime runs:" in out and "QLinearConv" in out
    assert "1. channels removed" in out and "2. distill" in out
    assert "3. quantized: weights 8 bits" in out
    for path in ("lenet5.safetensors", "pruned.safetensors", "student.safetensors",
                 "int8.safetensors", "lenet5-int8.onnx", "../lenet5/model.pjz"):
        assert (tmp_path / "runs/cli" / path).stat().st_size > 0, path
    # nothing lands beside the repository's own files: all of it is under the ignored runs/
    assert {p.name for p in tmp_path.iterdir()} == {"examples", ".venv", "runs"}
    on_disk = (tmp_path / "runs/cli/int8.safetensors").stat().st_size
    assert f"{on_disk:,} bytes on disk" in out  # penjing inspect prints the file's size
    assert (tmp_path / "runs/deep-compression/metrics.json").exists()
    assert "total sparsity 90.00%" in out
    assert (tmp_path / "runs/sensitivity/sensitivity.csv").exists()
