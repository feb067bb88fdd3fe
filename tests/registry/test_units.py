"""Units behind the contract: errors, records, blob stores, caches, hooks, open_registry."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import redis

import registry.redis_backend as redis_backend
import tangent
from registry import InvalidComponentError, StorageError, open_registry
from registry.file_blobs import FileBlobStore
from registry.local_cache import LocalCache, MemoryBlobStore
from registry.records import (
    ComponentSettings,
    VersionRecord,
    apply_add,
    component_from_json,
    component_to_json,
)
from registry.redis_tx import Keys
from registry.watch import Watch
from tests.registry.support import FP, REGION, Store, make_component


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_invalid_component_error_keeps_the_chained_cause() -> None:
    original = tangent.WrongShapeError("tensor 'x' has shape [1]")
    try:
        try:
            raise original
        except tangent.ComponentError as exc:
            raise InvalidComponentError(str(exc)) from exc
    except InvalidComponentError as wrapped:
        assert wrapped.cause is original and str(wrapped) == str(original)


def test_records_round_trip_through_json() -> None:
    version = VersionRecord("a" * 64, 1.5, 10, {"format": "tmc.component/1"})
    rec, created = apply_add(None, "x", version, ComponentSettings(weight=0.5, tags=("t",)))
    assert created and component_from_json(component_to_json(rec)) == rec
    with pytest.raises(StorageError, match="corrupt component record"):
        component_from_json('{"id": "x"}')


def test_file_blobs_are_content_addressed_and_atomic(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    data = b"bytes"
    digest = _digest(data)
    blobs.put(digest, data)
    assert blobs.get(digest) == data and blobs.exists(digest)
    assert blobs.path(digest) == tmp_path / digest[:2] / digest
    assert list(blobs.digests()) == [digest]
    (tmp_path / digest[:2] / f".{digest}.dead.tmp").write_bytes(b"partial")
    blobs.discard_partial()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [digest]
    blobs.delete(digest)
    assert blobs.get(digest) is None and not blobs.exists(digest)
    with pytest.raises(ValueError, match="not a sha256"):
        blobs.path("../../etc/passwd")


def test_local_cache_drops_a_corrupt_entry() -> None:
    cache = LocalCache(MemoryBlobStore())
    digest = _digest(b"good")
    cache.put(digest, b"evil")
    assert cache.get(digest) is None and cache.digests() == []


def test_memory_blobs_evict_least_recently_used() -> None:
    store = MemoryBlobStore(max_bytes=10)
    store.put("a", b"12345")
    store.put("b", b"12345")
    store.get("a")
    store.put("c", b"12345")
    assert sorted(store.digests()) == ["a", "c"]


def test_a_failing_hook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    watch = Watch()
    heard: list[list[str]] = []
    watch.on_forget(lambda digests: 1 / 0)  # type: ignore[func-returns-value]
    watch.on_forget(heard.append)
    watch.loaded("d1")
    with caplog.at_level(logging.ERROR):
        watch.forgotten(["d1", "d2"])
    assert heard == [["d1"]] and "hook" in caplog.text


def test_redis_key_layout() -> None:
    keys = Keys("tmc:")
    assert (keys.gen, keys.ids, keys.comps, keys.events) == (
        "tmc:gen", "tmc:ids", "tmc:comps", "tmc:events")
    assert keys.blob("ab" * 32) == f"tmc:blob:{'ab' * 32}" and keys.component("x") == "tmc:c:x"
    with pytest.raises(ValueError, match="not a sha256"):
        keys.blob("../x")


@pytest.mark.redis
def test_redis_reads_fall_back_to_an_atomic_snapshot(redis_store: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reg = redis_store.open()
    digest = reg.add("a", make_component(1).data).digest
    reg.put_composition("c", {"a": 2.0})
    monkeypatch.setattr(redis_backend, "OPTIMISTIC_READS", 0)
    assert reg.resolve_named("c").items[0].digest == digest
    assert [c.id for c in reg.list()] == ["a"] and reg.generation() == 2


def test_an_unreachable_redis_is_a_storage_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(StorageError, match="Redis registry unavailable"):
            open_registry(registry_dir=None, redis_url=f"redis://127.0.0.1:{port}/0",
                          base_fingerprint=FP, region=REGION, max_component_bytes=1000)


def test_open_registry_needs_a_location() -> None:
    with pytest.raises(ValueError, match="registry_dir"):
        open_registry(registry_dir=None, redis_url=None, base_fingerprint=FP, region=REGION,
                      max_component_bytes=1000)


def test_a_shared_file_store_keeps_young_partial_writes(tmp_path: Path) -> None:
    """On a shared volume a young temp file may be another replica's put in flight."""
    blobs = FileBlobStore(tmp_path, partial_grace_s=300.0)
    young = tmp_path / "ab" / f".{'ab' * 32}.young.tmp"
    old = tmp_path / "cd" / f".{'cd' * 32}.old.tmp"
    for temp in (young, old):
        temp.parent.mkdir()
        temp.write_bytes(b"partial")
    os.utime(old, (time.time() - 301, time.time() - 301))
    blobs.discard_partial()
    assert young.exists() and not old.exists()


@pytest.mark.redis
def test_a_full_redis_is_reported_as_full_and_nothing_changes(redis_store: Store,
                                                              redis_db: str) -> None:
    """maxmemory reached with noeviction: a clear 'full' StorageError, not 'unavailable'."""
    reg = redis_store.open()
    reg.add("kept", make_component(1).data)
    with redis.Redis.from_url(redis_db) as client:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used + 1024))
        try:
            with pytest.raises(StorageError, match="Redis registry is full") as err:
                notes = {f"notes{i}": "x" * 12_000 for i in range(4)}  # ~48 KB of metadata
                reg.add("big", make_component(2, provenance=notes).data)
            assert "maxmemory" in str(err.value) and "unavailable" not in str(err.value)
        finally:
            client.config_set("maxmemory", "0")
    assert [c.id for c in reg.list()] == ["kept"]
