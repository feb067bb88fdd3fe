"""Real base directories, each created and loaded once per test session (read-only to tests:
a test that tampers with a base copies it first)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from bases import Base, init_base, load_base, make_spec

# torch 2.13: the first forward-AD call in a process (load_base's check) imports
# torch._decomp.decompositions_for_jvp, which calls the deprecated torch.jit.script.
JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"

EFFNET_OPTIONS = {"image_size": 32, "tangent_blocks": 1}  # block15 + conv head + classifier
MINILM_OPTIONS = {"tangent_layers": 1}  # layer5 (attention, LayerNorm, GELU) + classifier


def _load(base_dir: Path) -> Base:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        return load_base(base_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bases") / "tiny"
    init_base(path, make_spec("tiny-mlp"))
    return path


@pytest.fixture(scope="session")
def tiny_base(tiny_dir: Path) -> Base:
    return _load(tiny_dir)


@pytest.fixture(scope="session")
def effnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bases") / "effnet"
    init_base(path, make_spec("effnet-lite0", options=EFFNET_OPTIONS))
    return path


@pytest.fixture(scope="session")
def effnet_base(effnet_dir: Path) -> Base:
    return _load(effnet_dir)


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bases") / "minilm"
    init_base(path, make_spec("minilm", options=MINILM_OPTIONS))
    return path


@pytest.fixture(scope="session")
def minilm_base(minilm_dir: Path) -> Base:
    return _load(minilm_dir)
