"""A shared Redis that restarts empty (no persistence) is noticed, refused, and recovered from.

Each test runs its own redis-server WITHOUT persistence, on a fixed port so that it can be
restarted empty under a live service: the realistic failure (a Redis pod rescheduled with no
volume), not a simulated one.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch

from loopback.ports import free_port
from loopback.process import MissingBinary, stop_process
from loopback.redis_server import redis_args, redis_binary, wait_for_ping
from registry import open_registry
from registry.core import RegistryLostError
from tests.app.conftest import (
    ADMIN,
    component_bytes,
    fresh_seed,
    live_server,
    settings_for,
)

pytestmark = [pytest.mark.redis]
AUTH = {"authorization": f"Bearer {ADMIN}"}
X = torch.randn(2, 64).tolist()


class RestartableRedis:
    """One redis-server on one port, no RDB, no AOF: a restart comes back empty."""

    def __init__(self, workdir: Path) -> None:
        try:
            self.binary = redis_binary()
        except MissingBinary as exc:
            pytest.fail(str(exc), pytrace=False)  # says how to install it
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = redis_args(self.binary, self.port, self.workdir, appendonly=False)
        with open(self.workdir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        if not wait_for_ping(self.url, self.proc):
            pytest.fail(f"redis-server did not start on {self.port}", pytrace=False)

    def restart_empty(self) -> None:
        assert self.proc is not None
        stop_process(self.proc)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def dump_all(client: redis.Redis) -> dict[bytes, bytes]:
    return {k: client.dump(k) for k in client.keys("*")}


def restore_all(client: redis.Redis, dumped: dict[bytes, bytes]) -> None:
    for key, value in dumped.items():
        client.restore(key, 0, value, replace=True)


def push(c: httpx.Client, base, *ids: str) -> None:
    for cid in ids:
        r = c.put(f"/v1/components/{cid}", content=component_bytes(base, fresh_seed()),
                  headers=AUTH)
        assert r.status_code == 201, r.text


def predict(c: httpx.Client, components: object = None) -> httpx.Response:
    body: dict[str, object] = {"inputs": X}
    if components is not None:
        body["components"] = components
    return c.post("/v1/predict", json=body)


def lost_metric(c: httpx.Client) -> float:
    m = re.search(r"^tmc_registry_lost (\S+)$", c.get("/metrics").text, re.M)
    assert m, "tmc_registry_lost is not exported"
    return float(m.group(1))


def readyz_after_reconnect(c: httpx.Client) -> httpx.Response:
    """/readyz, past a transient "Redis registry unavailable" while the client reconnects."""
    deadline = time.monotonic() + 10
    while True:
        r = c.get("/readyz")
        if "unavailable" not in r.json().get("registry_error", "") or (
                time.monotonic() > deadline):
            return r
        time.sleep(0.05)


def assert_lost(c: httpx.Client, why: str) -> None:
    r = readyz_after_reconnect(c)
    assert r.status_code == 503, r.text
    assert not r.json()["ready"] and "lost its data" in r.json()["registry_error"], r.text
    assert why in r.json()["registry_error"], r.text
    for spec in ("*", {"a": 1.0}, {"a": 0.5, "b": 0.5}):
        r = predict(c, spec)
        assert r.status_code == 503, (spec, r.status_code, r.text)
        msg = r.json()["error"]
        assert "the shared registry lost its data" in msg and why in msg, msg
        assert "refuses to serve compositions" in msg, msg
    r = predict(c)  # the base alone names nothing in the registry: still served
    assert r.status_code == 200, r.text
    assert r.json()["provenance"]["components"] == []
    assert lost_metric(c) == 1.0


def assert_serving(c: httpx.Client, ids: list[str]) -> None:
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"], r.text
    r = predict(c, "*")
    assert r.status_code == 200, r.text
    assert [t["id"] for t in r.json()["provenance"]["components"]] == ids
    assert lost_metric(c) == 0.0


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def test_redis_restarted_empty_refuses_then_recovers_from_a_restored_dump(
        own_redis, tiny_base_dir, tiny_base, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tmc")
    settings = settings_for(tiny_base_dir, tmp_path / "unused", redis_url=own_redis.url,
                            blob_cache_dir=tmp_path / "cache")
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as c:
        push(c, tiny_base, "a", "b")
        assert_serving(c, ["a", "b"])
        high = c.get("/readyz").json()["registry_generation"]
        assert high == 2
        backup = dump_all(own_redis.client())

        own_redis.restart_empty()  # the Redis pod came back with no data

        assert_lost(c, "generation 0 after 2; base key missing")
        lost_lines = events(caplog, "registry_lost")
        assert len(lost_lines) == 1, "one WARNING when the condition starts, not one per check"
        assert lost_lines[0].levelno == logging.WARNING
        assert "base key missing" in lost_lines[0].getMessage()
        assert not events(caplog, "registry_restored")

        restore_all(own_redis.client(), backup)  # the operator restores the backup

        assert_serving(c, ["a", "b"])
        restored = events(caplog, "registry_restored")
        assert len(restored) == 1 and restored[0].levelno == logging.INFO
        assert len(events(caplog, "registry_lost")) == 1
        r = predict(c, {"a": 1.0})
        assert r.status_code == 200, r.text


def test_flushed_redis_reclaimed_by_a_new_replica_is_still_refused_until_accepted(
        own_redis, tiny_base_dir, tiny_base, tmp_path):
    """A sibling replica (re)starting on the empty store writes the base key again and new
    pushes move the generation: neither may make the old replica serve the wiped registry
    as if nothing happened. Writing back a generation >= the one it had seen (what a restore
    does) makes it ready; a restart accepts a deliberately fresh registry."""
    settings = settings_for(tiny_base_dir, tmp_path / "unused", redis_url=own_redis.url,
                            blob_cache_dir=tmp_path / "cache")
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as c:
        push(c, tiny_base, "a", "b", "c")
        assert_serving(c, ["a", "b", "c"])
        own_redis.client().flushall()
        assert_lost(c, "generation 0 after 3; base key missing")

        # another replica (or `tmc` from a shell) opens the wiped store: claims the base
        with open_registry(registry_dir=None, redis_url=own_redis.url,
                           base_fingerprint=tiny_base.fingerprint, region=tiny_base.region,
                           listen=False) as other:
            assert other.generation() == 0  # a fresh process has nothing to compare with
            other.add("a", component_bytes(tiny_base, fresh_seed()))
        assert_lost(c, "generation 1 after 3")  # base key back, generation still behind
        push(c, tiny_base, "b")  # writes are not refused: re-pushing is a way back
        assert_lost(c, "generation 2 after 3")

        own_redis.client().set("tmc:gen", 3)  # an operator writes back the generation
        assert_serving(c, ["a", "b"])

    # a deliberately fresh registry: restarting the replica accepts it as it is
    own_redis.client().flushall()
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["registry_generation"] == 0, r.text
        push(c, tiny_base, "z")
        assert_serving(c, ["z"])


def test_concurrent_resolves_and_writes_never_look_like_a_lost_registry(own_redis, tiny_base):
    """Resolves on many threads while another process keeps changing the registry: a resolve
    that read an older generation than a sibling thread already saw must not raise."""
    kw = dict(registry_dir=None, redis_url=own_redis.url, base_fingerprint=tiny_base.fingerprint,
              region=tiny_base.region, listen=False)
    with open_registry(**kw) as reader, open_registry(**kw) as writer:
        writer.add("a", component_bytes(tiny_base, fresh_seed()))
        stop, errors = threading.Event(), []

        def resolve_loop() -> None:
            while not stop.is_set():
                try:
                    reader.resolve_all_active()
                    reader.generation()
                except RegistryLostError as exc:
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=resolve_loop) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for i in range(150):
                writer.reweight("a", 1.0 + (i % 7) / 10)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors[0]
        high = writer.generation()
        assert high > 100 and reader.generation() == high and reader.lost is None

        own_redis.client().flushall()
        with pytest.raises(RegistryLostError,
                           match=f"generation 0 after {high}; base key missing"):
            reader.resolve_all_active()
        assert reader.lost is not None
        reader.accept_current()  # the documented way to accept a fresh registry in-process
        assert reader.lost is None and reader.generation() == 0
