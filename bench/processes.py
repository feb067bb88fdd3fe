"""The processes a benchmark starts and reads: ``tmc serve`` on a free loopback port, stopped
on exit, and a process's resident memory and CPU time.

Policy: a server is started with only its own ``TMC_*`` settings, waited for until
``/readyz`` answers 200, and stopped with SIGTERM, then SIGKILL after a grace period; nothing
here touches a process it did not start. Memory and CPU readings come from psutil (the same
VmRSS and utime + stime the kernel reports in /proc), never from parsing /proc by hand.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from loopback.ports import free_port
from loopback.process import stop_process

REPO = Path(__file__).resolve().parent.parent


def tmc_command() -> list[str]:
    """The `tmc` CLI of this interpreter's environment."""
    script = Path(sys.executable).with_name("tmc")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())"]


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), in bytes."""
    return int(psutil.Process(pid).memory_info().rss)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (all its threads; this one by default), in s."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@dataclass
class Server:
    url: str
    port: int
    admin_token: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


@contextlib.contextmanager
def tmc_server(base_dir: Path, workdir: Path, *, env: dict[str, str] | None = None,
               command: list[str] | None = None, ready_timeout_s: float = 300.0
               ) -> Iterator[Server]:
    """`tmc serve` (uvicorn, real HTTP) on a free loopback port, stopped on exit.

    Only this server's TMC_* settings are passed (inherited TMC_* variables are dropped,
    so a developer's TMC_REDIS_URL cannot leak in); its log goes to workdir/server.log.
    """
    import httpx

    port = free_port()
    token = "bench-admin-" + secrets.token_hex(12)
    workdir.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TMC_")}
    child_env.update({
        "TMC_BASE_DIR": str(base_dir), "TMC_REGISTRY_DIR": str(workdir / "registry"),
        "TMC_HOME": str(workdir / "home"), "TMC_ADMIN_TOKEN": token,
        "TMC_HOST": "127.0.0.1", "TMC_PORT": str(port), "TMC_DEVICE": "cpu",
        "TMC_LOG_LEVEL": "warning", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
    log_path = workdir / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command or [*tmc_command(), "serve"], env=child_env,
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tmc serve exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tmc serve not ready after {ready_timeout_s:.0f} s")
            time.sleep(0.2)
        yield Server(url, port, token, proc, log_path)
    finally:
        stop_process(proc, grace_s=40)


