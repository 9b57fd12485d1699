"""Helpers shared by the benchmarks: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing


def machine() -> str:
    """One line saying where the figures were measured."""
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({threads} thread{'s' if threads != 1 else ''}), numpy {numpy.__version__}, "
        f"Python {platform.python_version()}"
    )


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=ROOT, capture_output=True, text=True,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_section(name: str, body: str, quick: bool = False, reproduce: str | None = None) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md, keeping the others.

    `name` is also the script's: bench/<name>.py wrote the section and reproduces it.

    A quick smoke run (`quick=True`) leaves the file alone: its figures are not the
    reference ones. `reproduce` replaces the default command in the footer (a benchmark
    that needs its own environment).
    """
    if quick:
        print(f"quick run: BENCHMARKS.md left as it was (section {name!r} not written)")
        return
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    reproduce = reproduce or (f"`.venv/bin/python bench/{name}.py` (`make bench` runs every "
                              "benchmark)")
    section = (
        f"{start}\n{body.rstrip()}\n\n_Measured {stamp} at revision {git_revision()} on "
        f"{machine()}. Reproduce with {reproduce}._\n{end}"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else (
        "# Benchmarks\n\nEvery figure here is written by a script under `bench/`; "
        "none is typed by hand. Ratios are measured side by side in one run.\n"
    )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + section + "\n"
    )
    tmp = BENCHMARKS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCHMARKS)
