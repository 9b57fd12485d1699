"""Shared fixtures: the bundled data, loaded once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import penjing as pj

# test files import shared layers (support_layers.py) from here under --import-mode=importlib
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (`make test` runs one worker per core) every worker gets one
    # thread: two workers of two threads each on two cores only wait on each other.
    # The CLI runs that tests start as subprocesses get one thread through OMP_NUM_THREADS.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The long end-to-end checks first, so that parallel workers do not end on them.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def mnist() -> pj.data.DataSplit:
    return pj.data.mnist()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
