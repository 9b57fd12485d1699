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
