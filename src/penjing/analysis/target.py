"""Goals for `penjing compress --target`: what "size=50x" and "latency=0.5" mean.

- `size=50x` (or `size=50`): the .pjz file at least 50 times smaller than the model's
  float32 tensors; a ratio > 1.
- `latency=0.5`: ONNX Runtime latency at most 0.5 of the FP32 model's; a fraction in
  (0, 1).

A goal in the wrong unit is refused with the form it takes, before anything runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from penjing.errors import PenjingError


class GoalError(PenjingError, ValueError):
    """A --target goal that does not parse, or is in the wrong unit."""


GOALS = {
    "size": "file size ratio against float32, > 1: size=50x",
    "latency": "ONNX Runtime latency as a fraction of FP32's, in (0, 1): latency=0.5",
}


@dataclass(frozen=True)
class Goal:
    kind: str  # a key of GOALS
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}" + ("x" if self.kind == "size" else "")


def parse_goal(text: str) -> Goal:
    """'size=50x' -> Goal('size', 50.0); 'latency=0.5' -> Goal('latency', 0.5)."""
    forms = "; ".join(GOALS.values())
    if not isinstance(text, str):
        raise GoalError(f"a goal is text such as 'size=50x', got {text!r}")
    match = re.fullmatch(r"\s*([a-z_]+)\s*=\s*([0-9.eE+-]+)\s*(x|×)?\s*", text)
    if not match:
        raise GoalError(f"cannot read the goal {text!r}; give one of: {forms}")
    kind, number, times = match.groups()
    if kind not in GOALS:
        raise GoalError(f"unknown goal {kind!r}; give one of: {forms}")
    try:
        value = float(number)
    except ValueError:
        raise GoalError(f"{kind}: {number!r} is not a number; {GOALS[kind]}") from None
    if not math.isfinite(value):
        raise GoalError(f"{kind} must be a finite number, got {number!r}; {GOALS[kind]}")
    if kind == "size" and not value > 1:
        raise GoalError(f"size is how many times smaller the file is, > 1, got {text!r}; "
                        "e.g. size=50x (a fraction such as 0.02 is not taken)")
    if kind == "latency":
        if times:
            raise GoalError(f"latency is a fraction of the FP32 latency, not a speed-up, "
                            f"got {text!r}; write a 2x speed-up as latency=0.5")
        if not 0 < value < 1:
            raise GoalError(f"latency must be in (0, 1) of the FP32 latency, got {text!r}; "
                            "e.g. latency=0.5 for twice as fast")
    return Goal(kind, value)
