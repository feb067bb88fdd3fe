"""A real redis-server for the tests, started on a free loopback port and stopped afterwards.

Use it from a conftest with ``from tests.conftest_redis import redis_server  # noqa: F401``.
It never touches a Redis it did not start, persists nothing, and fails (does not skip) when
the binary is missing, because ``make test`` installs it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_ping(url: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        try:
            if client.ping():
                return True
        except redis.ConnectionError:
            time.sleep(0.05)
        finally:
            client.close()
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start(binary: str, workdir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a fresh redis-server that lives for the test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `apt-get install redis-server` "
                    "(or `make setup`, which installs it)", pytrace=False)
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    for _ in range(3):  # another process may take the free port before redis binds it
        proc, url = _start(binary, workdir, log)
        if _wait_for_ping(url, proc):
            break
        _stop(proc)
    else:
        pytest.fail(f"redis-server did not start; see {log}:\n{log.read_text()[-2000:]}",
                    pytrace=False)
    try:
        yield url
    finally:
        _stop(proc)
