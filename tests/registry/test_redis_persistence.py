"""Forgetting reaches Redis's disk files: real redis-servers with AOF and/or RDB persistence.

Each test starts its own redis-server in its own directory (``rdbcompression no``: Redis
LZF-compresses long strings in RDB files and in the AOF's RDB preamble, which would hide the
patterns from a byte scan), adds components whose bytes carry a distinctive tensor pattern
and whose metadata carries a distinctive provenance string (tests/registry/support.py),
checks the persistence files hold both (so the scan is meaningful), forgets, waits until the
persistence report says every forget is covered, and scans every file in the Redis directory:
neither pattern is left. The registry keeps metadata as JSON text and bytes as raw strings,
so the raw patterns are what the files would hold (no hex or base64 forms to scan for).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bases import load_base
from loopback.ports import free_port
from loopback.process import MissingBinary, stop_process
from loopback.redis_server import redis_binary, wait_for_ping
from registry import ForgetReceipt, Registry, StorageError, StorePurge
from registry.redis_persistence import CHECK, ROUTE, persistence_report
from tangent import encode_component
from tests.app.conftest import (
    ADMIN,
    live_server,
    random_delta,
    settings_for,
    tiny_base_dir,  # noqa: F401  (a fixture)
)
from tests.registry.support import Made, Store, make_component

pytestmark = pytest.mark.redis
WAIT_S = 120.0  # how long a test waits for Redis to finish what it was asked (never asserted)


@dataclass
class PersistentRedis:
    """One redis-server of a test, persisting (or not) into its own directory."""

    url: str
    data: Path
    proc: subprocess.Popen[bytes]
    args: list[str]
    log: Path
    clients: list[redis.Redis] = field(default_factory=list)

    def restart(self) -> None:
        """Stop it (SHUTDOWN: the AOF is flushed, a running rewrite is killed) and start it
        again on the same port and directory."""
        with redis.Redis.from_url(self.url) as client:
            client.shutdown(nosave=True)
        self.proc.wait(timeout=30)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        assert wait_for_ping(self.url, self.proc), self.log.read_text()[-2000:]

    def client(self) -> redis.Redis:
        self.clients.append(redis.Redis.from_url(self.url))
        return self.clients[-1]

    def info(self) -> dict[str, Any]:
        info = self.client().info("persistence")
        assert isinstance(info, dict)
        return info

    def files(self) -> dict[str, bytes]:
        """Every file under the Redis directory (appendonlydir/*, dump.rdb, temp files)."""
        return {str(p.relative_to(self.data)): p.read_bytes()
                for p in sorted(self.data.rglob("*")) if p.is_file()}

    def holding(self, pattern: bytes) -> list[str]:
        return [name for name, data in self.files().items() if pattern in data]

    def wait_idle(self) -> None:
        """Until no rewrite runs or is scheduled."""
        keys = ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")
        wait_for(lambda: not any(int(self.info()[k]) for k in keys), "Redis to go idle")


def wait_for(predicate: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"waited {WAIT_S:g} s for {what}")


def _launch(binary: str, data: Path, log: Path, options: list[str]) -> PersistentRedis:
    for _ in range(3):  # another process may take the free port before redis binds it
        port = free_port()
        args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
                "--daemonize", "no", "--rdbcompression", "no", *options]
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        if wait_for_ping(url, proc):
            return PersistentRedis(url, data, proc, args, log)
        stop_process(proc)
    pytest.fail(f"redis-server did not start; see {log}:\n{log.read_text()[-2000:]}",
                pytrace=False)


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., PersistentRedis]]:
    """start_redis(appendonly=..., save=..., extra=[...]): a fresh persisting redis-server."""
    try:
        binary = redis_binary()
    except MissingBinary as exc:  # says how to install it
        pytest.fail(str(exc), pytrace=False)
    started: list[PersistentRedis] = []

    def start(*, appendonly: bool, save: str, extra: tuple[str, ...] = ()) -> PersistentRedis:
        data = tmp_path / f"redis-{len(started)}"
        data.mkdir()
        options = ["--appendonly", "yes" if appendonly else "no", "--save", save, *extra]
        started.append(_launch(binary, data, tmp_path / f"redis-{len(started)}.log", options))
        return started[-1]

    yield start
    for server in started:
        for client in server.clients:
            client.close()
        with redis.Redis.from_url(server.url) as client, suppress(redis.ConnectionError):
            client.shutdown(nosave=True)  # its directory may be gone: no save on the way out
        stop_process(server.proc)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[[PersistentRedis], Store]]:
    stores: list[Store] = []

    def open_(server: PersistentRedis) -> Store:
        stores.append(Store("redis", tmp_path / f"store-{len(stores)}", server.url))
        return stores[-1]

    yield open_
    for store in stores:
        store.close_all()


def persistence_entry(receipt: ForgetReceipt) -> StorePurge:
    entries = [p for p in receipt.purged if p.store == "redis-persistence"]
    assert len(entries) == 1, receipt.purged
    return entries[0]


def wait_covered(reg: Registry) -> dict[str, Any]:
    """Until the persistence report says every forget of this process is in rewritten files."""
    def covered() -> dict[str, Any] | None:
        report = persistence_report(reg)
        assert report["state"] in ("purged", "rewriting"), report
        return report if report["covered"] else None

    report: dict[str, Any] = wait_for(covered, "the forgets to be covered by a rewrite")
    return report


def add_and_persist(server: PersistentRedis, reg: Registry, seeds: list[int],
                    snapshot: bool) -> list[Made]:
    """Add components and make sure the persistence files hold their patterns."""
    made = [make_component(seed) for seed in seeds]
    for seed, m in zip(seeds, made, strict=True):
        reg.add(f"c{seed}", m.data)
    if snapshot:
        server.wait_idle()
        server.client().bgsave()
        server.wait_idle()
    for m in made:
        for pattern in (m.tensor_pattern, m.provenance_pattern):
            wait_for(lambda p=pattern: server.holding(p), f"{pattern!r} to reach the files")
    return made


def slow_rewrite(server: PersistentRedis, delay_us_per_key: int) -> None:
    """Start an AOF rewrite that takes delay_us_per_key per key; later ones run at full
    speed (the child keeps the setting it forked with)."""
    admin = server.client()
    admin.config_set("rdb-key-save-delay", delay_us_per_key)
    admin.bgrewriteaof()
    admin.config_set("rdb-key-save-delay", 0)


def assert_gone(server: PersistentRedis, made: list[Made]) -> None:
    for m in made:
        assert server.holding(m.tensor_pattern) == [], "tensor bytes left in Redis's files"
        assert server.holding(m.provenance_pattern) == [], "provenance left in Redis's files"


def test_aof_and_rdb_are_rewritten_and_hold_nothing_of_the_forgotten_id(start_redis,
                                                                         open_store):
    server = start_redis(appendonly=True, save="3600 1")
    reg = open_store(server).open()
    victim, bystander = add_and_persist(server, reg, [1, 2], snapshot=True)
    for pattern in (victim.tensor_pattern, victim.provenance_pattern):
        held = server.holding(pattern)  # the scan finds what the files hold
        assert "dump.rdb" in held and any(n.startswith("appendonlydir/") for n in held), held
    aof_before = {n for n in server.files() if n.startswith("appendonlydir/")
                  and not n.endswith(".manifest")}

    entry = persistence_entry(reg.forget("c1"))
    assert (entry.kind, entry.state in ("purged", "rewriting")) == ("aof+rdb", True), entry
    assert entry.state == "purged" or ROUTE in entry.check
    report = wait_covered(reg)

    assert report["persistence"] == "aof+rdb" and report["forgets"] == 1
    assert_gone(server, [victim])
    # Redis 7's multi-part AOF: the base and incr files from before the rewrite are deleted
    assert aof_before.isdisjoint(server.files()), (aof_before, sorted(server.files()))
    for pattern in (bystander.tensor_pattern, bystander.provenance_pattern):
        held = server.holding(pattern)  # the rewritten files are real: the bystander stays
        assert "dump.rdb" in held and any(n.startswith("appendonlydir/") for n in held), held


def test_rdb_only_is_rewritten(start_redis, open_store):
    server = start_redis(appendonly=False, save="3600 1")
    reg = open_store(server).open()
    victim, bystander = add_and_persist(server, reg, [3, 4], snapshot=True)
    assert server.holding(victim.tensor_pattern) == ["dump.rdb"]

    entry = persistence_entry(reg.forget("c3"))
    assert (entry.kind, entry.state in ("purged", "rewriting")) == ("rdb", True), entry
    assert wait_covered(reg)["persistence"] == "rdb"

    assert_gone(server, [victim])
    assert server.holding(bystander.tensor_pattern) == ["dump.rdb"]


def test_without_persistence_the_receipt_says_not_persisted(start_redis, open_store):
    server = start_redis(appendonly=False, save="")
    reg = open_store(server).open()
    reg.add("c5", make_component(5).data)
    before = server.info()["rdb_saves"]

    entry = persistence_entry(reg.forget("c5"))

    assert (entry.kind, entry.state) == ("none", "not-persisted"), entry
    report = persistence_report(reg)
    assert (report["state"], report["persistence"], report["covered"]) == (
        "not-persisted", "none", True)
    assert server.files() == {} and server.info()["rdb_saves"] == before  # nothing written


def test_a_rewrite_running_before_the_forget_does_not_count(start_redis, open_store):
    """The rewrite already running when the delete happens forked a snapshot that still
    holds the id: the receipt must not call that purged, and another rewrite must follow."""
    server = start_redis(appendonly=True, save="")
    reg = open_store(server).open()
    made = add_and_persist(server, reg, [6, 7, 8], snapshot=False)
    rewrites = int(server.info()["aof_rewrites"])
    slow_rewrite(server, 300_000)  # 0.3 s per key, ~16 keys: forks now, before the delete

    entry = persistence_entry(reg.forget("c6"))

    assert (entry.kind, entry.state) == ("aof", "rewriting"), entry
    assert "started before the delete" in entry.detail and entry.check == CHECK
    report = persistence_report(reg)
    assert (report["state"], report["covered"], report["rewrite_in_progress"]) == (
        "rewriting", False, True), report
    wait_covered(reg)
    assert int(server.info()["aof_rewrites"]) >= rewrites + 2
    assert_gone(server, made[:1])
    assert server.holding(made[1].provenance_pattern)


def test_a_burst_of_forgets_is_covered_by_few_rewrites(start_redis, open_store):
    server = start_redis(appendonly=True, save="")
    reg = open_store(server).open()
    ids = list(range(100, 120))
    made = add_and_persist(server, reg, ids, snapshot=False)
    rewrites = int(server.info()["aof_rewrites"])
    slow_rewrite(server, 30_000)  # ~84 keys: 2.5 s, so every delete below lands while it runs
    receipts: list[ForgetReceipt] = []
    threads = [threading.Thread(target=lambda i=i: receipts.append(reg.forget(f"c{i}")))
               for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(receipts) == len(ids)
    assert {persistence_entry(r).state for r in receipts} <= {"purged", "rewriting"}
    wait_covered(reg)
    server.wait_idle()
    # the slow one that started before the deletes, then one (at most two) after them
    assert 2 <= int(server.info()["aof_rewrites"]) - rewrites <= 3
    assert_gone(server, made)


def test_a_refused_rewrite_is_reported_failed(start_redis, open_store):
    """A Redis that does not allow BGREWRITEAOF: the files keep the data, the receipt says so."""
    server = start_redis(appendonly=True, save="", extra=("--rename-command", "BGREWRITEAOF",
                                                            ""))
    reg = open_store(server).open()
    (victim,) = add_and_persist(server, reg, [9], snapshot=False)

    entry = persistence_entry(reg.forget("c9"))

    assert (entry.kind, entry.state) == ("aof", "failed"), entry
    assert "BGREWRITEAOF refused" in entry.detail and entry.check == CHECK
    report = persistence_report(reg)
    assert (report["state"], report["covered"]) == ("failed", False), report
    assert "refused" in report["files"]["aof"]["error"]
    assert server.holding(victim.provenance_pattern)  # honest: it is still there


def test_a_failed_snapshot_is_reported_failed(start_redis, open_store):
    """BGSAVE's child cannot write (its directory is gone): rdb_last_bgsave_status:err."""
    server = start_redis(appendonly=False, save="3600 1")
    reg = open_store(server).open()
    add_and_persist(server, reg, [10], snapshot=True)
    shutil.rmtree(server.data)

    entry = persistence_entry(reg.forget("c10"))

    assert entry.kind == "rdb" and entry.state in ("failed", "rewriting"), entry

    def settled() -> dict[str, Any] | None:
        report = persistence_report(reg)
        return None if report["state"] == "rewriting" else report

    report = wait_for(settled, "the snapshot to end")
    assert (report["state"], report["covered"]) == ("failed", False), report
    assert "rdb_last_bgsave_status:err" in report["files"]["rdb"]["error"]


def test_managed_redis_without_config_says_unknown_and_still_rewrites_the_aof(start_redis,
                                                                              open_store):
    server = start_redis(appendonly=True, save="", extra=("--rename-command", "CONFIG", ""))
    reg = open_store(server).open()
    (victim,) = add_and_persist(server, reg, [11], snapshot=False)

    entry = persistence_entry(reg.forget("c11"))

    assert (entry.kind, entry.state) == ("aof", "unknown"), entry
    assert "CONFIG GET save is refused" in entry.detail and entry.check == CHECK
    report = wait_for(lambda: (r := persistence_report(reg))["files"]["aof"]["covered"] and r,
                      "the AOF rewrite")
    assert report["state"] == "unknown" and report["files"]["rdb"]["on"] is None
    assert_gone(server, [victim])


def test_a_redis_that_refuses_info_gives_unknown(start_redis, open_store):
    server = start_redis(appendonly=True, save="", extra=("--rename-command", "INFO", ""))
    reg = open_store(server).open()
    reg.add("c12", make_component(12).data)

    entry = persistence_entry(reg.forget("c12"))

    assert (entry.state, entry.check) == ("unknown", CHECK), entry
    assert "BGREWRITEAOF" in entry.detail
    report = persistence_report(reg)
    assert (report["state"], report["forgets"]) == ("unknown", 1), report


def test_the_report_of_an_unreachable_redis_is_a_storage_error(start_redis, open_store):
    server = start_redis(appendonly=True, save="")
    reg = open_store(server).open()
    with redis.Redis.from_url(server.url) as client:
        client.shutdown(nosave=True)
    server.proc.wait()

    with pytest.raises(StorageError, match="unreachable"):
        persistence_report(reg)


def test_a_redis_restart_before_the_rewrite_still_ends_purged(start_redis, open_store):
    """Redis restarts (its rewrite counters start again) while the forget waits for a rewrite:
    a rewrite of the new run is asked for and covers it."""
    server = start_redis(appendonly=True, save="")
    reg = open_store(server).open()
    victim, bystander = add_and_persist(server, reg, [13, 14], snapshot=False)
    slow_rewrite(server, 300_000)  # started before the delete, killed by the restart

    entry = persistence_entry(reg.forget("c13"))
    assert entry.state == "rewriting", entry
    server.restart()

    wait_covered(reg)
    assert_gone(server, [victim])
    assert server.holding(bystander.provenance_pattern)


# -- the admin route, through the app over real HTTP --------------------------------------

def test_the_admin_route_reports_redis_persistence(start_redis, tiny_base_dir,  # noqa: F811
                                                   tmp_path):
    server = start_redis(appendonly=True, save="")
    base = load_base(tiny_base_dir)
    secret = "provenance-route-test-0042"
    data = encode_component(random_delta(base, 42, scale=1000.0), base.fingerprint,
                            {"data": secret})
    settings = settings_for(tiny_base_dir, tmp_path / "unused", redis_url=server.url,
                            blob_cache_dir=tmp_path / "cache")
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=60) as anonymous, \
            httpx.Client(base_url=url, timeout=60,
                         headers={"authorization": f"Bearer {ADMIN}"}) as admin:
        assert anonymous.get("/v1/admin/registry/persistence").status_code == 401
        assert admin.put("/v1/components/route", content=data).status_code == 201
        wait_for(lambda: server.holding(secret.encode()), "the provenance to reach the AOF")
        receipt = admin.delete("/v1/components/route").json()
        entry = [p for p in receipt["purged"] if p["store"] == "redis-persistence"]
        assert len(entry) == 1 and entry[0]["state"] in ("purged", "rewriting"), receipt

        def covered() -> dict[str, Any] | None:
            response = admin.get("/v1/admin/registry/persistence")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body if body["covered"] else None

        report = wait_for(covered, "the route to report the forget covered")
    assert (report["backend"], report["persistence"], report["forgets"]) == ("redis", "aof", 1)
    assert server.holding(secret.encode()) == []


def test_the_admin_route_says_what_sqlite_does(tiny_base_dir, tmp_path):  # noqa: F811
    settings = settings_for(tiny_base_dir, tmp_path / "registry")
    with live_server(settings) as url, httpx.Client(
            base_url=url, timeout=60, headers={"authorization": f"Bearer {ADMIN}"}) as admin:
        response = admin.get("/v1/admin/registry/persistence")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["backend"], body["covered"]) == ("sqlite", True)
    assert "secure_delete" in body["detail"] and "wal_checkpoint" in body["detail"]
