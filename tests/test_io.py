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
