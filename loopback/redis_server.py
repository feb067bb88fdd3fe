"""redis-server on a free loopback port, ready once it answers PING.

Persistence (``appendonly``):

- True (the default): as the Helm chart runs it, ``appendonly yes`` with ``appendfsync
  everysec`` and no RDB save rules, so a forget pays the AOF rewrite the registry asks for;
- False: nothing is persisted (no AOF, no RDB): a restart comes back empty.

Either way ``maxmemory-policy noeviction`` (the chart's: Redis refuses a write rather than
drop an index key), its files and ``redis.log`` in the caller's folder.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from loopback.ports import free_port
from loopback.process import ServerDidNotStart, find_binary, log_tail, stop_process

INSTALL_HINT = "run `apt-get install redis-server` (or `make setup`, which installs it)"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 30.0  # SIGTERM makes redis flush its AOF first
ATTEMPTS = 3  # another process may take the free port before redis binds it


def redis_binary() -> str:
    """The redis-server on PATH; MissingBinary says how to install it."""
    return find_binary("redis-server", INSTALL_HINT)


def redis_args(binary: str, port: int, workdir: Path, *, appendonly: bool) -> list[str]:
    """The command line of a redis-server on 127.0.0.1:``port`` with its files in ``workdir``."""
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
            "--save", "", "--maxmemory-policy", "noeviction", "--daemonize", "no"]
    if appendonly:
        return args + ["--appendonly", "yes", "--appendfsync", "everysec"]
    return args + ["--appendonly", "no"]


def wait_for_ping(url: str, proc: subprocess.Popen[bytes],
                  timeout_s: float = START_TIMEOUT_S) -> bool:
    """True once the server at ``url`` answers PING; False if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.05)
    return False


def _start_answering(binary: str, workdir: Path, appendonly: bool
                     ) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server that answers PING, on a fresh free port (ATTEMPTS tries)."""
    log = workdir / "redis.log"
    for _ in range(ATTEMPTS):
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(redis_args(binary, port, workdir, appendonly=appendonly),
                                    stdout=out, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        if wait_for_ping(url, proc):
            return proc, url
        stop_process(proc)
    raise ServerDidNotStart(f"redis-server did not start; see {log}:\n{log_tail(log)}")


@contextlib.contextmanager
def redis_server(workdir: Path, *, appendonly: bool = True) -> Iterator[str]:
    """The URL of a fresh redis-server with its files in ``workdir``, stopped on exit."""
    binary = redis_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    proc, url = _start_answering(binary, workdir, appendonly)
    try:
        yield url
    finally:
        stop_process(proc, STOP_GRACE_S)
