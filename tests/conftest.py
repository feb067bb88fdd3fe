"""Shared fixtures: fresh randomness for every test, with the seed recorded for replay."""

from __future__ import annotations

import os
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
