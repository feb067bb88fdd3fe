"""The two registry setups bench.scale measures, each started here on loopback, and Redis's
memory readings.

- ``redis+s3``: the shared index in a redis-server run as the Helm chart runs it (AOF on,
  ``appendfsync everysec``, no RDB), component bytes in S3 (SeaweedFS ``weed mini``, a
  versioned bucket), a replica's local byte cache on disk;
- ``sqlite+files``: the embedded index (SQLite, WAL) and content-addressed blob files;
- and, for the memory comparison only, a Redis that holds the bytes too
  (``TMC_BLOB_URL=redis``).

A ``Setup`` is one open registry and what the measurements recorded for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scale_workload import BUCKET, FP, MAX_COMPONENT_BYTES, REGION, LargeMaker, Plan
from loopback.redis_server import redis_server
from loopback.weed import FOREIGN_AWS_ENV, S3Endpoint, weed_server
from registry import Registry, open_registry


# -- one setup ---------------------------------------------------------------------------------
@dataclass
class Setup:
    """One registry setup being measured, and what has been recorded for it."""

    name: str
    reg: Registry
    redis_url: str | None = None
    small_ids: list[str] = field(default_factory=list)
    large_ids: list[str] = field(default_factory=list)
    out: dict[str, Any] = field(default_factory=lambda: {
        "add_small": [], "add_large": [], "resolve": [], "star": [], "forget": [],
        "redis_memory": []})

    def used_memory(self) -> dict[str, int] | None:
        if self.redis_url is None:
            return None
        return redis_memory(self.redis_url)


MEMORY_FIELDS = ("used_memory", "used_memory_dataset", "key_bytes")


def redis_memory(url: str) -> dict[str, int]:
    """INFO memory ``used_memory`` (everything Redis allocated, transient client buffers
    included) and ``used_memory_dataset``; ``key_bytes``: MEMORY USAGE summed over every key
    (exact, allocator size classes included, nothing transient)."""
    import redis

    with redis.Redis.from_url(url) as client:
        info = client.info("memory")
        pipe = client.pipeline(transaction=False)
        for key in client.scan_iter(count=1000):
            pipe.memory_usage(key, samples=0)
        key_bytes = sum(int(n or 0) for n in pipe.execute())
    return {"used_memory": int(info["used_memory"]),
            "used_memory_dataset": int(info["used_memory_dataset"]), "key_bytes": key_bytes}


def per_component(after: dict[str, int], before: dict[str, int], count: int) -> dict[str, float]:
    """Growth per component, for each INFO field."""
    return {f: (after[f] - before[f]) / count for f in MEMORY_FIELDS}


def set_appendonly(url: str, on: bool) -> None:
    """Turn the AOF on or off at runtime (on: Redis writes a fresh base file first)."""
    import redis

    with redis.Redis.from_url(url) as client:
        client.config_set("appendonly", "yes" if on else "no")
        if on:
            while int(client.info("persistence")["aof_rewrite_in_progress"]):
                time.sleep(0.05)


# -- setups ------------------------------------------------------------------------------------
@contextmanager
def aws_env(s3: S3Endpoint) -> Iterator[None]:
    """The ``AWS_*`` variables boto3 reads, pointing at ``s3``; restored afterwards."""
    names = [*s3.env(), *FOREIGN_AWS_ENV]
    saved = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ.pop(n, None)
    os.environ.update(s3.env())
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@contextmanager
def redis_s3_setup(tmp: Path) -> Iterator[tuple[Setup, dict[str, int]]]:
    """Redis index (AOF on) + S3 bytes in a versioned bucket; and Redis's memory before."""
    with (redis_server(tmp / "redis") as url,
          weed_server(tmp / "weed", identity="tmc-bench") as s3, aws_env(s3)):
        s3.make_bucket(BUCKET, versioned=True)
        before = redis_memory(url)
        reg = open_registry(registry_dir=None, redis_url=url, base_fingerprint=FP,
                            region=REGION, max_component_bytes=MAX_COMPONENT_BYTES,
                            cache_dir=tmp / "replica-cache", blob_url=f"s3://{BUCKET}/scale")
        try:
            yield Setup("redis+s3", reg, url), before
        finally:
            reg.close()


@contextmanager
def sqlite_files_setup(tmp: Path) -> Iterator[tuple[Setup, dict[str, int]]]:
    reg = open_registry(registry_dir=tmp / "registry", redis_url=None, base_fingerprint=FP,
                        region=REGION, max_component_bytes=MAX_COMPONENT_BYTES)
    try:
        yield Setup("sqlite+files", reg), {}
    finally:
        reg.close()


def redis_bytes_memory(tmp: Path, plan: Plan, payloads: list[bytes]) -> dict[str, Any]:
    """Redis memory per component when Redis holds the bytes too (TMC_BLOB_URL=redis)."""
    maker = LargeMaker()
    with redis_server(tmp / "redis-bytes", appendonly=False) as url:
        before = redis_memory(url)
        with open_registry(registry_dir=None, redis_url=url, base_fingerprint=FP,
                           region=REGION, max_component_bytes=MAX_COMPONENT_BYTES,
                           blob_url="redis") as reg:
            for i in range(plan.redis_bytes_small):
                reg.add(f"s-{i:05d}", payloads[i], active=False)
            after_small = redis_memory(url)
            for i in range(plan.redis_bytes_large):
                reg.add(f"large-{i:04d}", maker.make(i), active=False)
            after_large = redis_memory(url)
    return {"small": plan.redis_bytes_small, "large": plan.redis_bytes_large,
            "before": before, "after_small": after_small, "after_large": after_large,
            "per_small": per_component(after_small, before, plan.redis_bytes_small),
            "per_large": per_component(after_large, after_small, plan.redis_bytes_large),
            "small_component_bytes": len(payloads[0]),
            "large_component_bytes": len(maker.make(0))}


def s3_memory(out: dict[str, Any], before: dict[str, int], plan: Plan) -> dict[str, Any]:
    """Per component from the S3 setup's readings (victims are forgotten by then)."""
    small = [m for m in out["redis_memory"] if "large" not in m]
    after_small = small[-1]
    after_large = next(m for m in out["redis_memory"] if "large" in m)
    return {"small": plan.small, "large": plan.large, "before": before,
            "after_small": after_small, "after_large": after_large,
            "per_small": per_component(after_small, before, plan.small),
            "per_large": per_component(after_large, after_small, plan.large),
            "by_size": [{"components": m["components"],
                         **per_component(m, before, m["components"])} for m in small]}
