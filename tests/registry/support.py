"""Test support: a tiny tangent region, component bytes with a findable byte pattern, and a
``Store`` that opens registries on one index + blob store and inspects everything it stored."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
from botocore.exceptions import ClientError

from registry import Registry, open_registry
from tangent import TangentParam, encode_component

FP = "f" * 64
OTHER_FP = "e" * 64
REGION = {
    "fc.weight": TangentParam("fc.weight", (4, 3), "float32"),
    "fc.bias": TangentParam("fc.bias", (4,), "float32"),
}
MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Made:
    """Component bytes plus byte patterns that occur in them and nowhere else."""

    data: bytes
    tensor_pattern: bytes
    provenance_pattern: bytes


def make_component(seed: int = 0, *, fingerprint: str = FP,
                   tensors: dict[str, torch.Tensor] | None = None,
                   provenance: dict[str, object] | None = None) -> Made:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, generator=gen) + 1000.0 + seed  # distinctive float32 bytes
    tensors = tensors if tensors is not None else {
        "fc.weight": weight, "fc.bias": torch.randn(4, generator=gen)}
    secret = f"provenance-{seed:06d}-{''.join(map(str, weight.shape))}-tmc"
    data = encode_component(tensors, fingerprint, {"data": secret, **(provenance or {})})
    return Made(data, weight.numpy().tobytes()[:24], secret.encode())


@dataclass
class Store:
    """One index + blob store combination, shared by every Registry a test opens on it.

    ``kind`` is "<index>+<blobs>": the index is "sqlite" (in ``registry_dir``) or "redis"
    (at ``url``); the bytes are where ``blob_url`` says (None: the default for the index,
    files in ``registry_dir/blobs`` or the same Redis). ``s3`` is the raw boto3 client the
    test inspects the bucket with (every version of every object), bypassing the registry.
    """

    kind: str
    root: Path
    url: str | None = None
    blob_url: str | None = None
    s3: Any = None
    bucket: str | None = None
    prefix: str = ""  # this test's keys in the bucket
    opened: list[Registry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if "+" not in self.kind:  # an index alone: its default blob store
            self.kind += "+file" if self.kind == "sqlite" else "+redis"

    @property
    def index(self) -> str:
        return self.kind.split("+")[0]

    @property
    def blobs(self) -> str:
        return self.kind.split("+")[1]

    @property
    def cached(self) -> bool:
        """Whether registries keep a local byte cache (Redis index, or S3 bytes)."""
        return self.index == "redis" or self.blobs == "s3"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry"

    @property
    def blob_dir(self) -> Path | None:
        """The folder of the bytes (file blob stores only)."""
        if self.blobs != "file":
            return None
        if self.blob_url is None:
            return self.registry_dir / "blobs"
        return Path(self.blob_url.removeprefix("file://"))

    def open(self, *, cache: str = "cache", listen: bool = True, fingerprint: str = FP,
             max_bytes: int = MAX_BYTES) -> Registry:
        reg = open_registry(
            registry_dir=self.registry_dir if self.index == "sqlite" else None,
            redis_url=self.url if self.index == "redis" else None,
            base_fingerprint=fingerprint, region=REGION, max_component_bytes=max_bytes,
            cache_dir=self.root / cache, listen=listen, blob_url=self.blob_url)
        self.opened.append(reg)
        return reg

    def close_all(self) -> None:
        for reg in self.opened:
            reg.close()
        if self.s3 is not None:
            self.s3.close()

    def blob_files(self) -> list[str]:
        blobs = self.blob_dir
        if blobs is None or not blobs.exists():
            return []
        return sorted(p.name for p in blobs.rglob("*") if p.is_file())

    def blob_digests(self) -> list[str]:
        """The digests whose bytes the blob store holds (S3: any version of the key)."""
        if self.blobs == "file":
            return self.blob_files()
        if self.blobs == "redis":
            return sorted(k.decode().removeprefix("tmc:blob:") for k in self.redis_keys()
                          if k.startswith(b"tmc:blob:"))
        return sorted({key.rsplit("/", 1)[1] for key, _ in self.s3_versions()})

    def redis_keys(self) -> set[bytes]:
        if self.url is None:
            return set()
        with redis.Redis.from_url(self.url) as client:
            return set(client.scan_iter("*"))

    def state(self) -> tuple[list[str], set[bytes]]:
        """What is stored: the blob digests, and the Redis keys that are not blobs."""
        keys = {k for k in self.redis_keys() if not k.startswith(b"tmc:blob:")}
        return self.blob_digests(), keys

    def s3_versions(self) -> list[tuple[str, str]]:
        """(key, version id) of every object version under the test's prefix (delete
        markers too)."""
        if self.s3 is None:
            return []
        found = []
        pages = self.s3.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/")
        for page in pages:
            for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
                found.append((str(entry["Key"]), str(entry.get("VersionId") or "null")))
        return found

    def _s3_values(self) -> Iterator[tuple[str, bytes]]:
        for key, version in self.s3_versions():
            yield f"s3://{self.bucket}/{key}?versionId={version}", key.encode()
            try:
                body = self.s3.get_object(Bucket=self.bucket, Key=key, VersionId=version)
            except ClientError:  # a delete marker has no body
                continue
            yield f"s3://{self.bucket}/{key}?versionId={version}", body["Body"].read()

    def raw_values(self) -> Iterator[tuple[str, bytes]]:
        """Every byte the registry keeps: files under the root (index, WAL, blobs, caches),
        every Redis value, and every version of every object under the S3 prefix."""
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                yield str(path), path.read_bytes()
        if self.url is not None:
            yield from _redis_values(self.url)
        yield from self._s3_values()

    def find(self, pattern: bytes) -> list[str]:
        return [where for where, value in self.raw_values() if pattern in value]


def _redis_values(url: str) -> Iterator[tuple[str, bytes]]:
    with redis.Redis.from_url(url) as client:
        for key in client.scan_iter("*"):
            kind = client.type(key).decode()
            if kind == "string":
                yield key.decode(), client.get(key) or b""
            elif kind == "hash":
                for k, v in client.hgetall(key).items():
                    yield key.decode(), k + b"=" + v
            elif kind == "set":
                yield key.decode(), b"\n".join(client.smembers(key))
            yield "key", key
