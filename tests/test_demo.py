"""The demo end to end on a tiny budget, through the command line."""

from __future__ import annotations

import json

import pytest
import torch

import penjing as pj
from penjing.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--out", str(out), "--dense-epochs", "2", "--rounds", "1",
                 "--finetune-epochs", "1", "--quant-epochs", "1", "--quiet"])
    return code, out


def test_demo_writes_everything_and_measures_the_loaded_file(demo_run):
    code, out = demo_run
    assert code == 0
    for name in ("model.pjz", "metrics.json", "report.md", "weights_dense.png",
                 "weights_pruned.png", "weights_quantized.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compressed_bytes"] == (out / "model.pjz").stat().st_size
    assert metrics["dense_bytes"] == 266_610 * 4
    assert metrics["compression_ratio"] == pytest.approx(
        metrics["dense_bytes"] / metrics["compressed_bytes"])
    assert metrics["compression_ratio"] > 30
    assert metrics["loaded_bit_exact"] is True
    # The accuracy comes from the file: re-measure it here from model.pjz.
    model = pj.models.create("lenet300")
    model.load_state_dict(pj.codec.load(out / "model.pjz"))
    test = torch.utils.data.DataLoader(pj.data.mnist().test, batch_size=500)
    assert pj.train.evaluate(model, test) == metrics["compressed_accuracy"]
    assert metrics["compressed_accuracy"] > 0.85
    kept = {row["layer"]: row["kept"] for row in metrics["layers"] if "kept" in row}
    assert kept["fc1.weight"] == pytest.approx(0.06, abs=1e-9)
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.94, abs=1e-6)
    assert torch.unique(model.fc1.weight).numel() <= 2**5
    assert "![pruned](weights_pruned.png)" in (out / "report.md").read_text()


def test_the_demo_table_describes_the_file_on_disk(demo_run):
    _, out = demo_run
    size = (out / "model.pjz").stat().st_size
    rows = json.loads((out / "metrics.json").read_text())["layers"]
    assert rows[-1]["layer"] == "total" and rows[-1]["bytes"] == size
    assert sum(row["bytes"] for row in rows[:-1]) == size
    stored = {r.name: r for r in pj.codec.inspect(out / "model.pjz").layers}
    for row in rows[:-2]:
        assert row["bytes"] == stored[row["layer"]].total_bytes
        assert row["stored"].split(":")[0] == stored[row["layer"]].encoding
        assert row["paper_pq"] > row["paper_pqh"] > 0  # Huffman beats fixed-width here
    report = (out / "report.md").read_text()
    assert "Huff |" not in report and "| paper P+Q+H |" in report


def test_demo_reuses_the_cached_dense_model(demo_run, capsys):
    _, out = demo_run
    cached = out / "dense-lenet300-e2-s0.safetensors"
    assert cached.exists()
    stamp = cached.stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--dense-epochs", "2", "--rounds", "1",
                 "--finetune-epochs", "0", "--quant-epochs", "0", "--quiet"]) == 0
    assert cached.stat().st_mtime_ns == stamp
    assert "loaded from" in capsys.readouterr().out


def test_inspect_prints_the_table(demo_run, capsys):
    _, out = demo_run
    assert main(["inspect", str(out / "model.pjz")]) == 0
    printed = capsys.readouterr().out
    row = next(line.split() for line in printed.splitlines() if line.startswith("fc1.weight"))
    assert row[2] in ("sparse", "dense")  # codebook-coded, whichever stream is smaller


def test_inspect_of_a_broken_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.pjz"
    bad.write_bytes(b"PJZ\x00" + bytes(30))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "penjing inspect: error:" in err and str(bad) in err


def test_unknown_demo_model_names_the_choices(tmp_path):
    from penjing.demo import run_demo

    with pytest.raises(ValueError, match=r"the demo runs \['lenet300', 'lenet5'\], got 'vgg'"):
        run_demo("vgg", tmp_path, progress=False)


@pytest.mark.slow
def test_a_rerun_from_the_cached_dense_model_gives_the_same_figures(tmp_path):
    # the dense training must not leave the fine-tuning's shuffles different from a
    # run that loads the cached model
    args = ["demo", "--out", str(tmp_path), "--dense-epochs", "1", "--rounds", "1",
            "--finetune-epochs", "1", "--quant-epochs", "1", "--quiet"]
    assert main(args) == 0
    fresh = json.loads((tmp_path / "metrics.json").read_text())
    fresh_file = (tmp_path / "model.pjz").read_bytes()
    assert main(args) == 0
    cached = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("dense_accuracy", "compressed_accuracy", "stage_accuracy", "compressed_bytes"):
        assert cached[key] == fresh[key], key
    assert (tmp_path / "model.pjz").read_bytes() == fresh_file
