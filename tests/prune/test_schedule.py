from __future__ import annotations

import pytest

from penjing.prune import agp, iterative


def test_iterative_ends_at_target_and_removes_same_share_each_round():
    steps = iterative(0.92, rounds=3)
    assert steps[-1] == pytest.approx(0.92)
    keeps = [1.0] + [1 - s for s in steps]
    shares = [b / a for a, b in zip(keeps, keeps[1:], strict=False)]
    assert shares == pytest.approx([shares[0]] * 3)


def test_agp_is_cubic_and_clamped():
    assert agp(0, final=0.9, steps=10) == 0.0
    assert agp(10, final=0.9, steps=10) == pytest.approx(0.9)
    assert agp(50, final=0.9, steps=10) == pytest.approx(0.9)
    assert agp(5, final=0.9, steps=10) == pytest.approx(0.9 * (1 - 0.5**3))


def test_schedules_check_their_input():
    with pytest.raises(ValueError, match="rounds"):
        iterative(0.5, rounds=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        agp(1, final=1.5, steps=3)
