"""Test support: a tiny tangent region, component bytes with a findable byte pattern, and a
``Store`` that opens registries on one backend and inspects everything it stored."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
import torch

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
    """One backend's storage, shared by every Registry a test opens on it."""

    kind: str  # "sqlite" | "redis"
    root: Path
    url: str | None = None
    opened: list[Registry] = field(default_factory=list)

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry"

    def open(self, *, cache: str = "cache", listen: bool = True, fingerprint: str = FP,
             max_bytes: int = MAX_BYTES) -> Registry:
        reg = open_registry(
            registry_dir=self.registry_dir if self.kind == "sqlite" else None,
            redis_url=self.url, base_fingerprint=fingerprint, region=REGION,
            max_component_bytes=max_bytes, cache_dir=self.root / cache, listen=listen)
        self.opened.append(reg)
        return reg

    def close_all(self) -> None:
        for reg in self.opened:
            reg.close()

    def blob_files(self) -> list[str]:
        blobs = self.registry_dir / "blobs"
        return sorted(p.name for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else []

    def redis_keys(self) -> set[bytes]:
        if self.url is None:
            return set()
        with redis.Redis.from_url(self.url) as client:
            return set(client.scan_iter("*"))

    def state(self) -> tuple[list[str], set[bytes]]:
        """What is stored: blob files (embedded) and Redis keys (shared)."""
        return self.blob_files(), self.redis_keys()

    def raw_values(self) -> Iterator[tuple[str, bytes]]:
        """Every byte the registry keeps: files under the root (index, WAL, blobs, caches)
        and every Redis value."""
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                yield str(path), path.read_bytes()
        if self.url is not None:
            yield from _redis_values(self.url)

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
