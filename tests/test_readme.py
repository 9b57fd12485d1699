"""The README's Python examples run as written, in order, in a scratch folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    ratio, accuracy = re.search(r"(\d+)x smaller, accuracy ([\d.]+)%", printed).groups()
    assert int(ratio) >= 20 and float(accuracy) > 85
    assert (tmp_path / "model.pjz").stat().st_size < 60_000
    onnx = (tmp_path / "vgg-int8.onnx").read_bytes()
    assert b"QuantizeLinear" in onnx and b"DequantizeLinear" in onnx
