"""Every failure a user can cause ends `tmc` with one `error: ...` line on stderr and the
documented exit code (README, "## CLI"): 1 server unreachable/error, 2 bad usage or a 4xx,
3 missing dataset (tests/training/test_cli.py), 4 base missing or tampered; never a traceback.

Each test runs the real command, `python -m cli` (what the `tmc` console script calls:
test_the_console_script_runs_cli_main), of this checkout in a subprocess, with TMC_*
pointing at temp dirs; the 4xx cases talk to the in-process uvicorn of tests/app/conftest.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bases import init_base, make_spec
from tests.app.conftest import ADMIN, free_port, live_server, settings_for

REPO = Path(__file__).resolve().parents[2]


def tmc(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TMC_")}
    base.update(TMC_HOME=str(tmp_path / "home"), TMC_BASE_DIR=str(tmp_path / "no-base"),
                TMC_REGISTRY_DIR=str(tmp_path / "registry"), TMC_DEVICE="cpu",
                TMC_PORT=str(free_port()), TMC_LOG_LEVEL="warning",
                TMC_SERVER=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    base.update(env)
    return subprocess.run([sys.executable, "-m", "cli", *argv], env=base, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def assert_fails(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Exit code ``code``; stderr's last non-empty line is ``error: ...`` holding every
    needle; no traceback anywhere. Returns that line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, f"nothing on stderr; stdout:\n{proc.stdout}"
    last = lines[-1]
    assert proc.returncode == code, f"exit {proc.returncode} != {code}\n{proc.stderr[-3000:]}"
    assert last.startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


# -- tmc serve / tmc base --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_serve_refuses_a_tampered_base_with_exit_4(tiny_base_dir: Path, tmp_path: Path,
                                                   where: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    weights = base / "theta0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5 if where == "tensor data" else 8] ^= 0x01  # one byte
    weights.write_bytes(bytes(data))
    proc = tmc(tmp_path, "serve", TMC_BASE_DIR=str(base))
    assert_fails(proc, 4, str(base))
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr


def test_serve_without_a_base_dir_exits_4(tmp_path: Path) -> None:
    proc = tmc(tmp_path, "serve", TMC_BASE_DIR=str(tmp_path / "missing"))
    assert_fails(proc, 4, "no base at", "tmc base init")


def test_serve_with_invalid_settings_exits_2(tmp_path: Path) -> None:
    proc = tmc(tmp_path, "serve", "--port", "70000")
    assert_fails(proc, 2, "invalid settings", "port")
    proc = tmc(tmp_path, "serve", TMC_CONFIG_FILE=str(tmp_path / "missing.json"))
    assert_fails(proc, 2, "settings file", "missing.json")


def test_base_show_of_a_missing_base_exits_4(tmp_path: Path) -> None:
    assert_fails(tmc(tmp_path, "base", "show", "--base", str(tmp_path / "nope")), 4, "no base")


def test_base_init_into_a_non_empty_dir_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = tmc(tmp_path, "base", "init", "--preset", "tiny-mlp", "--out", str(out))
    assert_fails(proc, 2, "not empty", "--force")
    assert (out / "notes.txt").read_text() == "keep me"


def test_base_init_bad_preset_or_option_exits_2(tmp_path: Path) -> None:
    out = str(tmp_path / "b")
    assert_fails(tmc(tmp_path, "base", "init", "--preset", "nope", "--out", out), 2,
                 "unknown preset")
    assert_fails(tmc(tmp_path, "base", "init", "--preset", "tiny-mlp", "--out", out,
                     "--option", "image_size"), 2, "KEY=VALUE")


def test_the_console_script_runs_cli_main() -> None:
    """`tmc` (pyproject's [project.scripts]) calls the function `python -m cli` runs."""
    import importlib
    import tomllib

    from cli.main import main

    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["tmc"]
    module, _, function = entry.partition(":")
    assert getattr(importlib.import_module(module), function) is main, entry


def test_usage_errors_end_with_an_error_line(tmp_path: Path) -> None:
    assert_fails(tmc(tmp_path, "push", "x.safetensors"), 2, "--id")
    assert_fails(tmc(tmp_path, "reweight", "a", "heavy"), 2, "heavy")
    assert_fails(tmc(tmp_path), 2, "no command")
    assert_fails(tmc(tmp_path, "base"), 2, "init or show")


# -- client commands without a server --------------------------------------------------------

def test_push_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    assert_fails(tmc(tmp_path, "push", str(missing), "--id", "a"), 2, str(missing),
                 "does not exist")
    assert_fails(tmc(tmp_path, "push", str(tmp_path), "--id", "a"), 2, "is not a file")


@pytest.mark.parametrize("argv", [["ls"], ["forget", "a"], ["reweight", "a", "0.5"],
                                  ["compose", "c", "a:0.5"], ["predict", "[1, 2]"]])
def test_an_unreachable_server_exits_1(tmp_path: Path, argv: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # a free loopback port: connection refused
    assert_fails(tmc(tmp_path, *argv, "--server", url), 1, "cannot reach", url)


def test_a_malformed_server_url_exits_2(tmp_path: Path) -> None:
    assert_fails(tmc(tmp_path, "ls", "--server", "http://[::1"), 2, "invalid server URL")


def test_compose_with_bad_weights_exits_2(tmp_path: Path) -> None:
    assert_fails(tmc(tmp_path, "compose", "c", "a:heavy"), 2, "not a number")


# -- client commands against a live server (4xx) -----------------------------------------------

def test_push_of_a_non_safetensors_file_shows_the_servers_4xx(server: str,
                                                              tmp_path: Path) -> None:
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("this is not a safetensors file\n")
    line = assert_fails(tmc(tmp_path, "push", str(bogus), "--id", "a", "--server", server,
                            TMC_ADMIN_TOKEN=ADMIN), 2)
    assert line.startswith("error: 4"), line  # "error: <4xx status>: <the server's message>"
    assert len(line) > len("error: 422: "), line


def test_forget_of_an_unknown_id_exits_2_with_the_404(server: str, tmp_path: Path) -> None:
    assert_fails(tmc(tmp_path, "forget", "never-pushed", "--server", server,
                     TMC_ADMIN_TOKEN=ADMIN), 2, "404", "never-pushed")


def test_a_bad_admin_token_exits_2_with_the_401(server: str, tmp_path: Path) -> None:
    assert_fails(tmc(tmp_path, "ls", "--server", server,
                     TMC_ADMIN_TOKEN="wrong-token-0123456789"), 2, "401")
    assert_fails(tmc(tmp_path, "ls", TMC_SERVER=server), 2, "401")  # no token, $TMC_SERVER


def test_predict_with_a_non_json_tensor_input_exits_2(server: str, tmp_path: Path) -> None:
    assert_fails(tmc(tmp_path, "predict", str(tmp_path / "x.json"), "--server", server), 2,
                 "not a JSON array")


@pytest.fixture(scope="module")
def image_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bases") / "effnet32"
    init_base(out, make_spec("effnet-lite0", options={"image_size": 32}))
    return out


@pytest.fixture
def image_server(image_base_dir: Path, tmp_path: Path) -> Iterator[str]:
    with live_server(settings_for(image_base_dir, tmp_path / "registry")) as url:
        yield url


def test_predict_with_a_missing_image_file_exits_2(image_server: str, tmp_path: Path) -> None:
    missing = tmp_path / "bag.png"
    assert_fails(tmc(tmp_path, "predict", "--all", str(missing), "--server", image_server), 2,
                 str(missing), "does not exist")
