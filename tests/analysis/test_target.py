"""Reading --target goals: the units each takes, and the error for the wrong one."""

from __future__ import annotations

import pytest

from penjing.analysis.target import Goal, GoalError, parse_goal


@pytest.mark.parametrize(("text", "goal"), [
    ("size=50x", Goal("size", 50.0)), ("size=50", Goal("size", 50.0)),
    (" size = 12.5× ", Goal("size", 12.5)), ("latency=0.5", Goal("latency", 0.5)),
])
def test_goals_that_read(text, goal):
    assert parse_goal(text) == goal


def test_a_goal_prints_as_it_is_written():
    assert str(parse_goal("size=50")) == "size=50x"
    assert str(parse_goal("latency=0.25")) == "latency=0.25"


@pytest.mark.parametrize(("text", "message"), [
    ("size=0.02", r"size is how many times smaller the file is, > 1, got 'size=0.02'"),
    ("latency=2x", r"latency is a fraction of the FP32 latency, not a speed-up"),
    ("latency=1.5", r"latency must be in \(0, 1\) of the FP32 latency"),
    ("speed=2", r"unknown goal 'speed'; give one of: file size ratio"),
    ("50x", r"cannot read the goal '50x'"),
    ("size=1..2", r"size: '1..2' is not a number"),
    ("size=inf", r"cannot read the goal"),
])
def test_goals_in_the_wrong_unit_are_refused(text, message):
    with pytest.raises(GoalError, match=message):
        parse_goal(text)
