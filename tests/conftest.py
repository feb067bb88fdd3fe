"""Shared fixtures: fresh randomness for every test, with the seed recorded for replay."""

# ruff: noqa: E402
from __future__ import annotations

import os

# Before torch is imported: on a small shared machine, OpenMP workers that spin while waiting
# make every torch op several times slower as soon as another process wants the cores
# (tests/tangent + tests/bases: 78 s spinning vs 15 s passive, 2 cores, load 5).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; ``TMC_TEST_SEED=<n>`` replays one. Printed, so failures show it."""
    env = os.environ.get("TMC_TEST_SEED")
    value = int(env) if env else random.SystemRandom().randrange(2**63)
    print(f"seed={value} (replay: TMC_TEST_SEED={value})")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded from ``seed``."""
    return torch.Generator().manual_seed(seed)
