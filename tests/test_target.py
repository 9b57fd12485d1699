"""Compression to a size goal under the accuracy guard (penjing.pipeline.compress_to_size
and `penjing compress --target`), on a small MLP and scikit-learn's digits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import penjing as pj
from penjing.cli import main
from penjing.errors import AccuracyGuardError, UnsupportedLayerError
from penjing.pipeline import compress_to_size

STAGES = {"prune_rounds": 1, "finetune_epochs": 2, "quant_epochs": 1}


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    split = pj.data.digits()
    train, test = pj.data.loaders(split, batch_size=64)
    model = tiny_mlp()
    pj.train.fit(model, train, epochs=5, progress=False)
    path = tmp_path_factory.mktemp("target") / "mlp.safetensors"
    pj.train.save_checkpoint(model, path)
    return model.eval(), train, test, path


def test_reaches_the_size_and_reports_the_interval(trained, tmp_path):
    model, train, test, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress_to_size(model, train, test, 8, tmp_path / "m.pjz", max_drop=0.03,
                              stages=STAGES, progress=False)
    size = (tmp_path / "m.pjz").stat().st_size
    assert result.compressed_bytes == size
    assert result.ratio == pytest.approx(result.original_bytes / size)
    assert result.ratio >= 8 and result.original_bytes == (64 * 64 + 64 + 64 * 10 + 10) * 4
    assert result.guard_drop <= 0.03
    # the figures are of the file: reload it and measure again
    loaded = tiny_mlp()
    loaded.load_state_dict(pj.codec.load(tmp_path / "m.pjz"))
    assert pj.train.evaluate(loaded, test) == pytest.approx(result.accuracy.value)
    assert result.accuracy.n == 360 and result.change.value == pytest.approx(
        result.accuracy.value - result.baseline.value)
    assert result.drop_verdict in ("met", "within noise")
    assert "goal 8×: met" in result.format()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.pjz"]


def test_an_unreachable_size_says_the_best_and_leaves_no_file(trained, tmp_path):
    model, train, test, _ = trained
    with pytest.raises(AccuracyGuardError, match=r"size=30x was not reached: the best file "
                       r"was 2\d.\d× after 2 tries \(bytes budget \d+ is below the \d+ bytes"
                       r" the table's largest ratio \(99%\) and fewest bits reach"):
        compress_to_size(model, train, test, 30, tmp_path / "m.pjz", max_drop=0.5,
                         stages=STAGES, progress=False)
    with pytest.raises(AccuracyGuardError, match=r"size=5000x allows 4 B, but the tensors "
                       r"that are not pruned or shared \(biases, norms: 296 B\)"):
        compress_to_size(model, train, test, 5000, tmp_path / "m.pjz", max_drop=0.5)
    assert list(tmp_path.iterdir()) == []


def test_a_drop_the_goal_breaks_is_an_error_and_leaves_no_file(trained, tmp_path):
    model, train, test, _ = trained
    with pytest.raises(AccuracyGuardError, match=r"size=14x cannot be kept within a drop of "
                       r"0: the best file at the goal, [\d.]+×, lost 0\.\d+ on the guard"):
        compress_to_size(model, train, test, 14, tmp_path / "m.pjz", max_drop=0.0,
                         stages={**STAGES, "finetune_epochs": 0, "quant_epochs": 0},
                         progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_nothing_to_compress(tmp_path):
    split = pj.data.digits()
    train, test = pj.data.loaders(split)
    with pytest.raises(UnsupportedLayerError, match="no Linear or Conv layer"):
        compress_to_size(nn.Sequential(nn.Flatten()), train, test, 10, tmp_path / "m.pjz",
                         max_drop=0.01)


@pytest.mark.slow
def test_command_writes_the_model_plan_and_report(trained, tmp_path, capsys):
    _, _, _, weights = trained
    out = tmp_path / "run"
    rc = main(["compress", "--target", "size=8x", "--model", "test_target:tiny_mlp",
               "--weights", str(weights), "--data", "digits", "--max-drop", "3",
               "--guard-images", "300", "--rounds", "1", "--finetune-epochs", "2",
               "--quant-epochs", "1", "--out-dir", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pjz", "plan.txt",
                                                     "report.md"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ratio"] >= 8 and metrics["size_met"] is True
    assert metrics["compressed_bytes"] == (out / "model.pjz").stat().st_size
    low, high = metrics["change"][1:]
    assert low <= metrics["change"][0] <= high
    assert "plan for bytes" in (out / "plan.txt").read_text()
    assert "test accuracy: input" in text and "95 % intervals, 360 images" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--target", "latency=0.5", "--model", "lenet300"], "latency goals are not implemented"),
    (["--target", "size=0.5", "--model", "lenet300"], "size is how many times smaller"),
    (["--target", "size=50x"], "--target needs --model"),
    (["recipe.yaml", "--target", "size=50x", "--model", "lenet300"], "not both"),
    ([], "give a RECIPE, or --target GOAL"),
    (["--target", "size=50x", "--model", "lenet300", "--max-drop", "200"],
     "--max-drop is in accuracy points"),
])
def test_bad_targets_are_one_clear_error(tmp_path, capsys, argv, message):
    assert main(["compress", *argv, "--out-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.pjz").exists()
