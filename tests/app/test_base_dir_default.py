"""app.settings.default_base_dir: the one rule every command uses for "the base directory"
when none is given (tmc serve's Settings read $TMC_BASE_DIR themselves, with the same
$TMC_HOME fallback at import)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import DEFAULT_HOME, Settings, default_base_dir, tmc_home


def test_base_dir_env_then_home_then_dot_tmc(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TMC_BASE_DIR", raising=False)
    monkeypatch.delenv("TMC_HOME", raising=False)
    assert (tmc_home(), default_base_dir()) == (Path(".tmc"), Path(".tmc/base"))
    monkeypatch.setenv("TMC_HOME", str(tmp_path / "home"))  # read at each call
    assert default_base_dir() == tmp_path / "home" / "base"
    monkeypatch.setenv("TMC_BASE_DIR", "")  # empty: not set
    assert default_base_dir() == tmp_path / "home" / "base"
    monkeypatch.setenv("TMC_BASE_DIR", str(tmp_path / "elsewhere"))
    assert default_base_dir() == tmp_path / "elsewhere"


def test_serve_settings_take_an_empty_base_dir_as_unset_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tmc serve` (Settings) and the other commands (default_base_dir) agree on an empty
    $TMC_BASE_DIR: unset, not the current directory."""
    monkeypatch.delenv("TMC_BASE_DIR", raising=False)
    assert Settings().base_dir == DEFAULT_HOME / "base"
    monkeypatch.setenv("TMC_BASE_DIR", "")
    assert Settings().base_dir == DEFAULT_HOME / "base" != Path(".")
    monkeypatch.setenv("TMC_BASE_DIR", str(tmp_path / "elsewhere"))
    assert Settings().base_dir == tmp_path / "elsewhere"
