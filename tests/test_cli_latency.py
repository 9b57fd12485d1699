"""Latency the CLI prints: a median with its spread, a warning when the spread is too wide
to compare, and for an exported file the time ONNX Runtime takes to run it."""

from __future__ import annotations

import re

import pytest

import penjing as pj
from penjing.cli import common, main


def test_spread_is_the_interquartile_range_over_the_median():
    assert common.spread([4.0, 6.0, 8.0, 10.0]) == (7.0, pytest.approx(3 / 7))
    assert common.spread([2.0, 2.0, 2.0]) == (2.0, 0.0)
    assert common.spread_warning(0.25) is None
    assert common.spread_warning(0.43).startswith("warning: the latency timings spread by 43%")


def test_export_times_the_file_in_onnx_runtime(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    weights, onnx = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    pj.save(pj.models.create("lenet300"), weights)
    assert main(["export", "lenet300", "--weights", str(weights), "--data", "none",
                 "--input-shape", "4,1,28,28", "--out", str(onnx)]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"ONNX Runtime latency, batch 4: ([\d.]+) ms ±(\d+)% \(median of 30 runs",
                      printed)
    assert found and float(found.group(1)) > 0
    assert ("warning: the latency timings spread" in printed) == (int(found.group(2)) * 2 > 25)
