"""The object store dies under a running service (Redis index + S3 bytes), then comes back.

A real redis-server holds the index and a dedicated SeaweedFS ``weed mini`` (this test stops
it, so it is not the session's) holds the bytes; the service runs in uvicorn on a loopback
port and is spoken to over HTTP. Component A is added and served (its tensors are now in the
replica's caches); B is added through another registry handle, so this replica never saw its
bytes. With the store stopped, the policy of ``Service.readiness`` and the fetch path holds:

- ``/readyz`` stays 200 (every replica shares the store: failing readiness would take them all
  out while cached compositions and the base still work) and says why in ``blob_store_error``;
- ``{A: 1}`` is served from the caches, with the same logits; the base alone is served;
- ``{B: 1}`` needs cold bytes: 503 naming the S3 store; a new PUT: 503, nothing registered;
- ``/metrics`` answers.

Then a replacement ``weed mini`` on the same ports, keys and data directory serves again, and
the same replica fetches B and takes a PUT without a restart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

import registry
from app.settings import Settings
from tests.app.conftest import ADMIN, component_bytes, fresh_seed, live_server, settings_for
from tests.conftest_s3 import S3Server, running_weed

pytestmark = [pytest.mark.redis, pytest.mark.slow]
REDIS_DB = 10  # a database of its own: other tests use 0
PREFIX = "svc"
INPUTS = [[0.25] * 64, [-0.5] * 64]


@dataclass
class DedicatedWeed:
    """A ``weed mini`` of this test alone, which the test stops and restarts."""

    workdir: Path
    server: S3Server
    stack: contextlib.ExitStack

    def stop(self) -> None:
        self.stack.close()

    def restart(self) -> None:
        """Same ports, keys and data: clients that knew the old one reconnect."""
        self.server = self.stack.enter_context(running_weed(self.workdir, like=self.server))


@pytest.fixture
def weed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DedicatedWeed]:
    workdir = tmp_path / "weed"
    workdir.mkdir()
    with contextlib.ExitStack() as stack:
        dedicated = DedicatedWeed(workdir, stack.enter_context(running_weed(workdir)), stack)
        dedicated.server.apply_env(monkeypatch)  # boto3 reads AWS_* when the registry opens
        yield dedicated
        dedicated.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    url = redis_server.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    yield url
    with redis.Redis.from_url(url) as client:
        client.flushdb()


@pytest.fixture
def settings(weed: DedicatedWeed, redis_url: str, tiny_base_dir: Path,
             tmp_path: Path) -> Settings:
    bucket = weed.server.make_bucket(versioned=True)
    return settings_for(tiny_base_dir, tmp_path / "unused", redis_url=redis_url,
                        blob_url=f"s3://{bucket}/{PREFIX}", blob_cache_dir=tmp_path / "cache")


def add_elsewhere(settings: Settings, tiny_base, cid: str, data: bytes, cache: Path) -> None:
    """Add through another registry handle (another replica's): the server's caches never
    see the bytes."""
    other = registry.open_registry(
        registry_dir=None, redis_url=settings.redis_url, base_fingerprint=tiny_base.fingerprint,
        region=tiny_base.region, cache_dir=cache, blob_url=settings.blob_url, listen=False)
    try:
        other.add(cid, data)
    finally:
        other.close()


def predict(client: httpx.Client, components: dict[str, float] | None) -> httpx.Response:
    body: dict[str, object] = {"inputs": INPUTS}
    if components is not None:
        body["components"] = components
    return client.post("/v1/predict", json=body)


def logits(response: httpx.Response) -> list[list[float]]:
    assert response.status_code == 200, response.text
    return [o["logits"] for o in response.json()["outputs"]]


def listed_ids(client: httpx.Client) -> set[str]:
    r = client.get("/v1/components")
    assert r.status_code == 200, r.text
    return {c["id"] for c in r.json()["components"]}


def assert_store_down_answers(client: httpx.Client, s3: S3Server, store: str,
                              a_logits: list[list[float]], tiny_base) -> None:
    """What each kind of request gets while the object store is down."""
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()
    assert checks["ready"] is True and checks["registry"] is True, checks
    assert checks["blob_store"] is False, checks
    bucket = store.removeprefix("s3://").split("/")[0]
    assert s3.endpoint in checks["blob_store_error"], checks
    assert f"bucket {bucket}" in checks["blob_store_error"], checks
    assert "unreachable" in checks["blob_store_error"], checks

    assert logits(predict(client, {"a": 1.0})) == a_logits  # the caches serve it
    assert logits(predict(client, None))  # the base alone
    cold = predict(client, {"b": 1.0})
    assert cold.status_code == 503, cold.text
    assert store in cold.json()["error"] and "unreachable" in cold.json()["error"], cold.text
    assert cold.headers.get("x-request-id"), cold.headers

    put = client.put("/v1/components/c", content=component_bytes(tiny_base, fresh_seed()))
    assert put.status_code == 503, put.text
    assert f"s3://{bucket}/{PREFIX}/blobs/" in put.json()["error"], put.text
    assert "AWS_ENDPOINT_URL" in put.json()["error"], put.text  # what to check
    assert listed_ids(client) == {"a", "b"}  # nothing registered
    assert client.get("/metrics").status_code == 200


def test_a_dead_object_store_fails_only_what_needs_it(weed, settings, tiny_base, tmp_path):
    store = str(settings.blob_url)
    with live_server(settings) as url, httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60) as client:
        r = client.put("/v1/components/a", content=component_bytes(tiny_base, fresh_seed()))
        assert r.status_code == 201, r.text
        a_logits = logits(predict(client, {"a": 1.0}))
        assert a_logits != logits(predict(client, None))  # A changes the answer
        add_elsewhere(settings, tiny_base, "b", component_bytes(tiny_base, fresh_seed()),
                      tmp_path / "other-cache")
        assert client.get("/readyz").json()["blob_store"] is True

        weed.stop()
        assert_store_down_answers(client, weed.server, store, a_logits, tiny_base)

        weed.restart()  # the same endpoint: the replica's client reconnects by itself
        assert client.get("/readyz").json()["blob_store"] is True
        assert logits(predict(client, {"b": 1.0})) != a_logits
        r = client.put("/v1/components/c", content=component_bytes(tiny_base, fresh_seed()))
        assert r.status_code == 201, r.text
        assert listed_ids(client) == {"a", "b", "c"}
