"""Files written by an earlier penjing still load and compute what they computed then
(tests/fixtures/legacy.py wrote them; they are never rewritten)."""

from __future__ import annotations

import pytest
import torch
from fixtures.legacy import CASES, HERE, output
from safetensors.torch import load_file

import penjing as pj


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_earlier_file_loads_and_computes_the_same(name):
    if "hf_" in name or "smooth" in name:
        pytest.importorskip("transformers")
    build, example = CASES[name]
    expected = load_file(HERE / "expected.safetensors")[name]
    model = pj.load(HERE / name, build)
    torch.testing.assert_close(output(model, example()), expected, rtol=1e-5, atol=1e-5)
