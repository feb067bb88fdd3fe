"""Two service processes sharing one real Redis index: a forget on A is exact on B at once.

It runs with the bytes in Redis, and with the bytes in a versioned S3 bucket (a real SeaweedFS
``weed mini``). With S3 the test also scans every store after the receipt for the forgotten
component: every object version and delete marker under the prefix, every Redis key and value,
and both replicas' byte caches hold neither its digest's object or files, nor its tensor bytes,
nor its provenance string.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import torch

from tangent import encode_component
from tests.app.conftest import ADMIN, component_bytes, free_port, fresh_seed, random_delta
from tests.conftest_s3 import S3Server

pytestmark = [pytest.mark.redis, pytest.mark.slow]
S3_PREFIX = "replicas"
REDIS_DB = {"redis bytes": 8, "s3 bytes": 9}  # databases of their own: other tests use 0


@dataclass(frozen=True)
class Stores:
    """Where the replicas keep their index (a Redis database) and bytes (Redis or S3)."""

    redis_url: str
    s3: S3Server | None = None
    bucket: str = ""

    @property
    def blob_url(self) -> str:
        return f"s3://{self.bucket}/{S3_PREFIX}" if self.s3 else "redis"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TMC_"))}
        env.update({"TMC_REDIS_URL": self.redis_url, "TMC_BLOB_URL": self.blob_url})
        if self.s3 is not None:
            env.update(self.s3.env())
        return env


@dataclass(frozen=True)
class Victim:
    """Component bytes whose tensor bytes and provenance string a raw scan can find."""

    data: bytes
    tensor_bytes: bytes  # 64 raw bytes of one of its tensors, as safetensors stores them
    provenance: bytes  # a metadata value no other component has

    def patterns(self) -> dict[str, bytes]:
        return {"tensor bytes": self.tensor_bytes, "provenance": self.provenance}


def make_victim(base) -> Victim:
    delta = random_delta(base, fresh_seed())  # name -> region tensor (float32)
    marker = f"victim-provenance-{secrets.token_hex(8)}"
    data = encode_component(delta, base.fingerprint, {"data": marker})
    tensor = next(iter(delta.values())).numpy().tobytes()[:64]
    assert tensor in data and marker.encode() in data  # so the scans look for what is stored
    return Victim(data, tensor, marker.encode())


@pytest.fixture(params=["redis bytes", "s3 bytes"])
def stores(request, redis_server) -> Iterator[Stores]:
    url = redis_server.rsplit("/", 1)[0] + f"/{REDIS_DB[request.param]}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    if request.param == "s3 bytes":
        s3: S3Server = request.getfixturevalue("s3_server")
        yield Stores(url, s3, s3.make_bucket(versioned=True))
    else:
        yield Stores(url)
    with redis.Redis.from_url(url) as client:
        client.flushdb()


def start_replica(base_dir: Path, stores: Stores, cache_dir: Path) -> tuple[subprocess.Popen,
                                                                            str]:
    port = free_port()
    env = {**stores.env(), "TMC_BASE_DIR": str(base_dir), "TMC_ADMIN_TOKEN": ADMIN,
           "TMC_DEVICE": "cpu", "TMC_BLOB_CACHE_DIR": str(cache_dir),
           "TMC_LOG_LEVEL": "warning", "TMC_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"replica at {url} not ready in time")


@pytest.fixture
def replicas(tiny_base_dir, stores, tmp_path):
    procs = [start_replica(tiny_base_dir, stores, tmp_path / f"cache{i}") for i in range(2)]
    try:
        for proc, url in procs:
            wait_ready(url, proc)
        yield [url for _, url in procs], [tmp_path / "cache0", tmp_path / "cache1"]
    finally:
        for proc, _ in procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def wait_for(condition, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def add_and_compose_everywhere(url_a: str, url_b: str, victim: Victim,
                               base) -> tuple[list[float], str]:
    """keep1, keep2 and the victim added on A; "*" served by both (each caches the bytes).
    Returns the inputs and the victim's digest."""
    auth = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url_a, headers=auth, timeout=30) as a:
        for cid in ("keep1", "keep2"):
            r = a.put(f"/v1/components/{cid}", content=component_bytes(base, fresh_seed()))
            assert r.status_code == 201, r.text
        r = a.put("/v1/components/victim", content=victim.data)
        assert r.status_code == 201, r.text
    x = torch.randn(2, 64).tolist()
    for url in (url_b, url_a):
        r = httpx.post(f"{url}/v1/predict", json={"inputs": x, "components": "*"}, timeout=30)
        assert {c["id"] for c in r.json()["provenance"]["components"]} == {
            "keep1", "keep2", "victim"}
    digest = next(c["digest"] for c in r.json()["provenance"]["components"]
                  if c["id"] == "victim")
    return x, digest


def test_forget_on_a_is_seen_by_every_request_admitted_later_on_b(replicas, stores, tiny_base):
    (url_a, url_b), caches = replicas
    victim = make_victim(tiny_base)
    x, victim_digest = add_and_compose_everywhere(url_a, url_b, victim, tiny_base)
    # the scans below find what is stored: both caches and the index hold the victim now
    assert all(cache_holding(cache, victim_digest, victim) for cache in caches)
    assert "provenance" in {what for what, _ in redis_holding(stores.redis_url, victim)}

    records: list[tuple[float, dict]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=url_b, timeout=30) as b:
            while not stop.is_set():
                sent = time.monotonic()
                resp = b.post("/v1/predict", json={"inputs": x, "components": "*"})
                assert resp.status_code == 200, resp.text
                records.append((sent, resp.json()))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    # at least 5 answers sent well before the DELETE (it counts "earlier" as sent 0.1 s
    # before the receipt): waiting for a count alone raced a fast hammer (seen: 4 of 12)
    wait_for(lambda: len(records) >= 12
             and sum(sent < time.monotonic() - 0.2 for sent, _ in records) >= 5)
    with httpx.Client(base_url=url_a, headers={"authorization": f"Bearer {ADMIN}"},
                      timeout=30) as a:
        receipt = a.delete("/v1/components/victim").json()
    forgot_at = time.monotonic()
    wait_for(lambda: sum(sent > forgot_at for sent, _ in records) >= 12)
    stop.set()
    for t in threads:
        t.join(30)

    assert receipt["digests_removed"] == [victim_digest]
    later = [body for sent, body in records if sent > forgot_at]
    earlier = [body for sent, body in records if sent < forgot_at - 0.1]
    assert len(later) >= 12 and len(earlier) >= 5, (len(later), len(earlier))
    with httpx.Client(base_url=url_b, timeout=30) as b:
        never_had_it = b.post("/v1/predict", json={
            "inputs": x, "components": {"keep1": 1.0, "keep2": 1.0}}).json()
    for body in later:
        ids = [c["id"] for c in body["provenance"]["components"]]
        assert ids == ["keep1", "keep2"], ids
        assert body["provenance"]["generation"] >= receipt["generation"]
        torch.testing.assert_close(  # batch-mates may change BLAS blocking: float tolerance
            torch.tensor([o["logits"] for o in body["outputs"]]),
            torch.tensor([o["logits"] for o in never_had_it["outputs"]]), rtol=1e-5, atol=1e-6)
    assert any("victim" in [c["id"] for c in b["provenance"]["components"]] for b in earlier)

    assert_receipt_names_every_store(receipt, stores)
    kept = {c["digest"] for c in never_had_it["provenance"]["components"]}
    if stores.s3 is not None:
        assert_s3_holds_nothing_of(stores, victim_digest, victim, kept)
    assert redis_holding(stores.redis_url, victim) == []
    # A purged its cache before the receipt, B on the forget event
    wait_for(lambda: not any(cache_holding(cache, victim_digest, victim) for cache in caches))


# -- what the forget leaves in each store ---------------------------------------------------

def assert_receipt_names_every_store(receipt: dict, stores: Stores) -> None:
    purged = {p["store"]: p for p in receipt["purged"]}
    assert [p["store"] for p in receipt["purged"]][:2] == ["index", "blobs"], receipt
    assert {"local-cache", "device-cache"} <= purged.keys(), receipt
    assert all(p["state"] == "purged" for name, p in purged.items()
               if name != "redis-persistence"), receipt
    assert purged["index"]["kind"] == "redis"
    if stores.s3 is not None:
        assert purged["blobs"]["kind"] == "s3"
        # one put of the victim on a versioned bucket: exactly one version to delete
        assert purged["blobs"]["detail"] == (
            f"1 object version(s) deleted from s3://{stores.bucket}/{S3_PREFIX}"), purged
    else:
        assert purged["blobs"]["kind"] == "redis"
        assert re.match(r"1 blob\(s\) deleted from Redis", purged["blobs"]["detail"]), purged
    assert purged["local-cache"]["kind"] == "file"
    assert purged["device-cache"]["kind"] == "cpu"


def s3_entries(stores: Stores) -> list[dict]:
    """Every object version and delete marker under the replicas' prefix (raw boto3)."""
    assert stores.s3 is not None
    client = stores.s3.client()
    try:
        found: list[dict] = []
        pages = client.get_paginator("list_object_versions").paginate(
            Bucket=stores.bucket, Prefix=f"{S3_PREFIX}/")
        for page in pages:
            found += page.get("Versions", []) + page.get("DeleteMarkers", [])
        for entry in found:
            if "Size" in entry:  # a version, not a delete marker: read its bytes
                entry["Body"] = client.get_object(
                    Bucket=stores.bucket, Key=entry["Key"],
                    VersionId=entry["VersionId"])["Body"].read()
        return found
    finally:
        client.close()


def assert_s3_holds_nothing_of(stores: Stores, digest: str, victim: Victim,
                               kept: set[str]) -> None:
    entries = s3_entries(stores)
    assert [e["Key"] for e in entries if digest in e["Key"]] == []
    # the scan sees the others' bytes: exactly one version of each kept component
    assert sorted(e["Key"].rsplit("/", 1)[1] for e in entries) == sorted(kept), entries
    for entry in entries:
        for what, pattern in victim.patterns().items():
            assert pattern not in entry.get("Body", b""), (what, entry["Key"])


def redis_values(url: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) for every key of the database, whatever its type."""
    with redis.Redis.from_url(url) as client:
        for key in client.scan_iter("*"):
            kind = client.type(key).decode()
            if kind == "string":
                values = [client.get(key) or b""]
            elif kind == "hash":
                values = [k + b"=" + v for k, v in client.hgetall(key).items()]
            elif kind == "set":
                values = list(client.smembers(key))
            elif kind == "zset":
                values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == "list":
                values = client.lrange(key, 0, -1)
            elif kind == "stream":
                values = [repr(entry).encode() for entry in client.xrange(key)]
            else:
                raise AssertionError(f"Redis key {key!r} of type {kind}: teach the scan to read it")
            yield key, key + b"\n" + b"\n".join(values)


def redis_holding(url: str, victim: Victim) -> list[tuple[str, bytes]]:
    """(what, key) for each Redis key whose name or value holds a victim pattern."""
    return [(what, key) for key, value in redis_values(url)
            for what, pattern in victim.patterns().items() if pattern in value]


def cache_holding(cache: Path, digest: str, victim: Victim) -> list[Path]:
    """Files of a replica's byte cache named by the digest or holding a victim pattern."""
    held = []
    for path in cache.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if digest in path.name or digest.encode() in data or any(
                    pattern in data for pattern in victim.patterns().values()):
                held.append(path)
    return held
