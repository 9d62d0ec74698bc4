"""Shared fixtures: a small synthetic Miniscapes set generated once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from data_prep.synthesize import synthesize

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["STREETMTL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """64x128 synthetic Miniscapes: 96 train / 24 val / 16 test."""
    return synthesize(str(tmp_path_factory.mktemp("data") / "miniscapes"), {"train": 96, "val": 24, "test": 16}, (64, 128), seed=1, workers=2)
