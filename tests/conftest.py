"""Shared fixtures: the bundled data, loaded once per test session."""

from __future__ import annotations

import pytest
import torch

import penjing as pj


@pytest.fixture(scope="session")
def mnist() -> pj.data.DataSplit:
    return pj.data.mnist()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
