"""Every size the CLI and the demo print is the file on disk: `penjing inspect` of a model
file and of a .pjz, and the demo's table beside the paper's own format."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import penjing as pj
from penjing.analysis.report import format_table, paper_table
from penjing.cli import main
from penjing.codec import huffman, relindex
from penjing.demo import paper_format, stream_coders


def _shared_model() -> nn.Module:
    """A small model whose first layer holds 7 distinct non-zero values at 80 % zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        w = model[0].weight
        w.copy_(torch.randint(-3, 4, w.shape).float() * 0.1)
        w[torch.rand(w.shape) < 0.8] = 0
    return model


def test_inspect_of_a_model_file_prints_its_size_on_disk(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    pj.save(_shared_model(), path)
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    on_disk, data = re.search(r"([\d,]+) bytes on disk \(([\d,]+) of tensor data\)",
                              printed).groups()
    assert int(on_disk.replace(",", "")) == path.stat().st_size
    assert int(data.replace(",", "")) == (64 * 32 + 32 + 32 * 4 + 4) * 4


def test_inspect_of_a_pjz_adds_up_to_the_file(tmp_path, capsys):
    path = tmp_path / "m.pjz"
    pj.codec.save(_shared_model(), path)
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines()
            if re.match(r"\d\.(weight|bias)", line)]
    found = re.search(r"-> ([\d,]+) B \([\d.]+x, ([\d,]+) B header", printed)
    total, header = (int(x.replace(",", "")) for x in found.groups())
    assert total == path.stat().st_size
    assert len(rows) == 4
    assert sum(int(row[-2].replace(",", "")) for row in rows) + header == total


def test_paper_format_is_the_relative_index_format_of_the_paper():
    # codes 1 (5.0) and 2 (7.0); 2-bit gaps: [2, 3, 0] with a padding entry for the 4 zeros
    t = torch.tensor([0, 0, 5, 0, 0, 0, 0, 7], dtype=torch.float32)
    sizes = paper_format(t, index_bits=2)
    assert sizes["pq"] == math.ceil(3 * (2 + 2) / 8) + 2 * 4  # 3 entries of 2+2 bits, codebook
    gaps, values = relindex.encode(np.array([0, 0, 1, 0, 0, 0, 0, 2]), 2)
    assert gaps.tolist() == [2, 3, 0]
    assert sizes["pqh"] == len(huffman.encode(gaps)) + len(huffman.encode(values)) + 8
    assert huffman.decode(huffman.encode(values)).tolist() == [1, 0, 2]


def test_the_table_is_what_the_file_stores(tmp_path):
    model = _shared_model()
    path = tmp_path / "m.pjz"
    report = pj.codec.save(model, path)
    coders = stream_coders(path)
    paper = {"0.weight": paper_format(model[0].weight, 5)}
    rows = paper_table(report, ["0.weight"], coders=coders, paper=paper)
    layer, others, total = rows
    stored = pj.codec.inspect(path)
    (entry,) = [r for r in stored.layers if r.name == "0.weight"]
    assert layer["bytes"] == entry.total_bytes and layer["encoding"] == entry.encoding
    assert total["bytes"] == path.stat().st_size
    assert layer["bytes"] + others["bytes"] == path.stat().st_size
    assert layer["bits_per_weight"] == pytest.approx(8 * entry.total_bytes / (64 * 32))
    streams = {"dense": ["codes"], "sparse": ["gaps", "values"]}[entry.encoding]
    assert list(coders["0.weight"]) == streams
    assert all(c in ("huffman", "rans", "fixed", "enumerative")
               for c in coders["0.weight"].values())
    assert total["paper_pq"] == paper["0.weight"]["pq"] + others["bytes"]
    text = format_table(rows)
    assert "Huff" not in text.splitlines()[0].replace("P+Q+H", "")  # no Huffman heading
    assert f"{path.stat().st_size:,}" in text.splitlines()[-1]
    assert layer["stored"].startswith(entry.encoding + ": ")
