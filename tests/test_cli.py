"""The `penjing` command turns bad input into one clear line and exit status 2."""

from __future__ import annotations

import pytest

from penjing.cli import main


def test_model_and_input_that_differ_is_one_line_not_a_traceback(capsys):
    assert main(["prune", "lenet5", "--input-shape", "1,3,32,32", "--data", "none",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("penjing prune: error: PyTorch refused the model:")
    assert "expected input[1, 3, 32, 32] to have 1 channels" in err
    assert "Traceback" not in err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.pjz")]) == 2
    assert "penjing inspect: error:" in capsys.readouterr().err


def test_unknown_subcommand_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["shrink"])
    assert stop.value.code == 2
    assert "invalid choice: 'shrink'" in capsys.readouterr().err


def test_sensitivity_verb_writes_the_table_and_meets_the_budget(tmp_path, capsys):
    import csv

    import penjing as pj

    weights = tmp_path / "m.safetensors"
    pj.save(pj.models.create("lenet300"), weights)
    out = tmp_path / "sens"
    assert main(["sensitivity", "lenet300", "--weights", str(weights), "--ratios", "0.5,0.9",
                 "--eval-images", "100", "--budget", "sparsity=0.8", "--skip", "fc3",
                 "--out-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.reader((out / "sensitivity.csv").open()))
    assert {r[0] for r in rows[1:]} >= {"fc1", "fc2"} and "fc3" not in {r[0] for r in rows}
    assert (out / "sensitivity.png").stat().st_size > 0
    assert "total sparsity 80.00%" in printed
    with pytest.raises(SystemExit) as stop:
        main(["sensitivity", "lenet300", "--weights", str(weights), "--budget", "speed=2"])
    assert stop.value.code == 2 and "KIND one of" in capsys.readouterr().err
