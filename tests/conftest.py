"""Shared fixtures: the bundled data, loaded once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import penjing as pj

# test files import shared layers (support_layers.py) from here under --import-mode=importlib
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def mnist() -> pj.data.DataSplit:
    return pj.data.mnist()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
