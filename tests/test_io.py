"""Atomic writes: the whole file or the old one, with the permissions open() would give."""

from __future__ import annotations

import stat

import pytest

from penjing.io import atomic_write_bytes


def test_written_file_has_the_mode_open_gives(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic.bin", b"payload")
    assert (tmp_path / "atomic.bin").read_bytes() == b"payload"
    assert stat.S_IMODE((tmp_path / "atomic.bin").stat().st_mode) == stat.S_IMODE(
        plain.stat().st_mode
    )


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def _dead_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_temps_of_killed_writes_are_removed_by_the_next_write_in_the_folder(tmp_path):
    import os

    target = tmp_path / "model.pjz"
    dead = tmp_path / f".model.pjz.penjing-{_dead_pid()}-0badc0de.tmp"
    dead.write_bytes(b"x" * 1000)
    alive = tmp_path / f".model.pjz.penjing-{os.getppid()}-00c0ffee.tmp"  # a live writer
    alive.write_bytes(b"y")
    other = tmp_path / f".other.pjz.penjing-{_dead_pid()}-12345678.tmp"  # another target
    other.write_bytes(b"z")
    other_legacy = tmp_path / ".other.pjz.ab_cd123.tmp"  # too unlike ours to touch
    other_legacy.write_bytes(b"v")
    os.utime(other_legacy, (1e9, 1e9))
    legacy = tmp_path / ".model.pjz.ab_cd123.tmp"  # mkstemp name of older penjing, a day old
    legacy.write_bytes(b"w")
    os.utime(legacy, (1e9, 1e9))
    atomic_write_bytes(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.pjz", alive.name, other_legacy.name]
    )


def test_a_folder_or_a_file_in_the_way_is_named(tmp_path):
    import pytest

    with pytest.raises(IsADirectoryError, match=f"'{tmp_path}' is a folder"):
        atomic_write_bytes(tmp_path, b"x")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        atomic_write_bytes(tmp_path / "f" / "g" / "x.bin", b"x")


def test_json_is_bounded():
    import pytest

    from penjing.io import parse_json

    assert parse_json('{"a": [1, -2, "]]]]"]}', "x") == {"a": [1, -2, "]]]]"]}
    with pytest.raises(ValueError, match="x nests 17 levels deep, more than 16"):
        parse_json("[" * 17 + "]" * 17, "x")
    with pytest.raises(ValueError, match="integer of 20 digits"):
        parse_json("[" + "9" * 20 + "]", "x")
    with pytest.raises(ValueError, match="beyond"):
        parse_json(str(2**63), "x")
    with pytest.raises(ValueError, match="NaN is not JSON"):
        parse_json("[NaN]", "x")
    with pytest.raises(ValueError, match="x is not valid JSON"):
        parse_json("[1,", "x")
