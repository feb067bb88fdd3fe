"""Bounded metadata, and resolution whose cost does not grow with history or metadata.

Costs are measured structurally, never by the clock: what the backend sends back (Redis
replies, SQLite rows) while resolving, and which ``Tx`` reads resolution makes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.connection

import tangent
from registry import InvalidComponentError, Registry, StorageError
from registry.file_blobs import FileBlobStore
from registry.records import ComponentSettings, VersionRecord, apply_add, component_to_json
from registry.types import ResolvedItem
from tests.registry.support import FP, Store, make_component

BIG = 1 << 20  # component size limit for these tests: metadata, not tensors, is what is big
VALUE = 15_000  # bytes per metadata value: 4 of them stay within 64 KiB in total
IDS = [f"c{i:02d}" for i in range(5)]


def heavy_metadata(seed: int) -> dict[str, object]:
    """About 60 KB of metadata: within the bound (64 KiB, 16 KiB per value)."""
    return {f"blob{k}": f"{seed:06d}" + "m" * (VALUE - 6) for k in range(4)}


# -- 1. bounded metadata ----------------------------------------------------------------


@pytest.mark.parametrize(("provenance", "what"), [
    ({f"k{i}": "x" * VALUE for i in range(5)}, "metadata is"),  # 75 KB in total
    ({"one": "x" * (16 * 1024 + 1)}, "value of 'one' is 16385 bytes"),
    ({"k" * (16 * 1024 + 1): "x"}, "key is 16385 bytes"),
])
def test_oversize_metadata_is_refused_and_nothing_is_stored(
        store: Store, provenance: dict[str, object], what: str) -> None:
    reg = store.open(max_bytes=BIG)
    before, generation = store.state(), reg.generation()
    data = make_component(1, provenance=provenance).data
    with pytest.raises(InvalidComponentError) as err:
        reg.add("big", data)
    message = str(err.value)
    assert what in message
    assert "64 KiB of metadata in total (MAX_METADATA_BYTES)" in message
    assert "16 KiB per key or value (MAX_METADATA_VALUE_BYTES)" in message
    assert store.state() == before and reg.generation() == generation and reg.list() == []
    from app.errors import status_for  # the service answers 422, like other bad files
    assert status_for(err.value) == 422
    made = make_component(1, provenance=heavy_metadata(1))  # ~60 KB: within the bound
    reg.add("full", made.data)
    assert reg.get("full").metadata == tangent.read_metadata(made.data)


# -- 2. resolution reads heads only ------------------------------------------------------


class TxSpy:
    """Records the name of every Tx method called through it."""

    def __init__(self, tx: Any, calls: list[str]) -> None:
        self._tx, self._calls = tx, calls

    def __getattr__(self, name: str) -> Any:
        self._calls.append(name)
        return getattr(self._tx, name)


def spy_reads(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    index = reg._index
    real = index.read
    monkeypatch.setattr(index, "read", lambda fn: real(lambda tx: fn(TxSpy(tx, calls))))
    return calls


def test_the_resolution_record_has_no_history_or_metadata() -> None:
    from registry.records import ComponentHead
    assert [f.name for f in fields(ComponentHead)] == ["id", "weight", "active", "current"]


def test_resolution_reads_no_record_history_or_metadata(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = store.open(max_bytes=BIG, listen=False)
    for seed in range(3):
        reg.add("a", make_component(seed, provenance=heavy_metadata(seed)).data)
    reg.put_composition("named", {"a": 1.0})
    calls = spy_reads(reg, monkeypatch)
    reg.resolve_all_active()
    reg.resolve_explicit({"a": 0.5})
    reg.resolve_named("named")
    assert "heads" in calls
    assert set(calls) <= {"heads", "generation", "composition", "owner"}, calls


# -- 3. what the backend sends back does not grow with history or metadata -----------------


def _size(value: object) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list | tuple):
        return sum(_size(v) for v in value)
    return len(str(value))


class CountingCursor:
    def __init__(self, cursor: sqlite3.Cursor, tally: list[int]) -> None:
        self._cursor, self._tally = cursor, tally

    def _count(self, row: Any) -> Any:
        if row is not None:
            self._tally.append(_size(list(row)))
        return row

    def fetchone(self) -> Any:
        return self._count(self._cursor.fetchone())

    def fetchall(self) -> list[Any]:
        return [self._count(r) for r in self._cursor.fetchall()]

    def __iter__(self) -> Iterator[Any]:
        return (self._count(r) for r in self._cursor)


class CountingConnection:
    """An sqlite3 connection that tallies the size of every row it returns."""

    def __init__(self, conn: sqlite3.Connection, tally: list[int]) -> None:
        self._conn, self._tally = conn, tally

    def execute(self, sql: str, args: Any = ()) -> CountingCursor:
        return CountingCursor(self._conn.execute(sql, args), self._tally)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def byte_counter(store: Store, reg: Registry,
                 monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], object]], int]:
    """``count(fn)``: bytes the backend returned while ``fn`` ran (Redis replies, SQLite rows)."""
    tally: list[int] = []
    if store.index == "redis":
        real = redis.connection.AbstractConnection.read_response

        def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
            response = real(self, *args, **kwargs)
            tally.append(_size(response))
            return response
        monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read_response)
    else:
        index: Any = reg._index
        monkeypatch.setattr(index, "_conn", CountingConnection(index._conn, tally))

    def count(fn: Callable[[], object]) -> int:
        tally.clear()
        fn()
        return sum(tally)
    return count


def light_then_heavy(store: Store, monkeypatch: pytest.MonkeyPatch,
                     reads: Callable[[Registry], dict[str, Callable[[], object]]]
                     ) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes each read fetched with one small version per id, then with 8 versions per id
    (7 of them with ~60 KB of metadata)."""
    reg = store.open(max_bytes=BIG, listen=False)
    for seed, cid in enumerate(IDS):
        reg.add(cid, make_component(seed).data)
    for cid in IDS:  # a two-digit generation before and after: replies of equal length
        reg.set_tags(cid, ["t"])
    reg.put_composition("all", dict.fromkeys(IDS, 1.0))
    assert 10 <= reg.generation() < 100
    count = byte_counter(store, reg, monkeypatch)
    light = {what: count(fn) for what, fn in reads(reg).items()}
    assert all(light.values()), light  # the counter sees the backend's replies
    for version in range(1, 8):
        for seed, cid in enumerate(IDS):
            reg.add(cid, make_component(100 * version + seed,
                                        provenance=heavy_metadata(version)).data)
    assert reg.generation() < 100 and all(len(reg.get(c).versions) == 8 for c in IDS)
    assert len(json.dumps(reg.get(IDS[0]).metadata)) > 60_000
    return light, {what: count(fn) for what, fn in reads(reg).items()}


def test_resolution_bytes_do_not_grow_with_history_or_metadata(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    light, heavy = light_then_heavy(store, monkeypatch, lambda reg: {
        "*": reg.resolve_all_active,
        "explicit": lambda: reg.resolve_explicit(dict.fromkeys(IDS, 0.5)),
        "named": lambda: reg.resolve_named("all")})
    assert heavy == light, (light, heavy)


def test_counting_components_reads_no_record(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``/metrics`` needs for tmc_components: a count, not a walk of the registry."""
    light, heavy = light_then_heavy(store, monkeypatch, lambda reg: {
        "count": lambda: reg.count() == len(IDS) or pytest.fail("wrong count")})
    assert heavy == light, (light, heavy)


# -- 4. indexes written before the split are migrated when opened ---------------------------


def _legacy_record(data: bytes) -> tuple[str, str]:
    digest = hashlib.sha256(data).hexdigest()
    version = VersionRecord(digest, 1.5, len(data), tangent.read_metadata(data))
    rec, _ = apply_add(None, "legacy", version, ComponentSettings(weight=0.5, tags=("old",)))
    return digest, component_to_json(rec)


LEGACY_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE components (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE owners (digest TEXT PRIMARY KEY, id TEXT NOT NULL);
CREATE TABLE compositions (name TEXT PRIMARY KEY, record TEXT NOT NULL);
"""


def _check_legacy_readable(reg: Registry, digest: str, data: bytes) -> None:
    info = reg.get("legacy")
    assert (info.digest, info.versions, info.weight, info.tags) == (
        digest, [digest], 0.5, ["old"])
    assert info.metadata == tangent.read_metadata(data) and info.created == 1.5
    assert reg.resolve_all_active().items == [ResolvedItem("legacy", digest, 0.5)]
    assert reg.load_bytes(digest) == data
    second = make_component(2).data
    reg.add("legacy", second)
    assert reg.get("legacy").versions == [digest, hashlib.sha256(second).hexdigest()]


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store("sqlite", tmp_path)
    yield s
    s.close_all()


def test_sqlite_index_of_schema_1_is_migrated_on_open(sqlite_store: Store) -> None:
    store = sqlite_store
    data = make_component(1).data
    digest, record = _legacy_record(data)
    store.registry_dir.mkdir(parents=True)
    path = store.registry_dir / "index.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(LEGACY_SCHEMA)
        conn.executemany("INSERT INTO meta VALUES (?, ?)",
                         [("generation", "1"), ("base_fingerprint", FP)])
        conn.execute("INSERT INTO components VALUES ('legacy', ?)", (record,))
        conn.execute("INSERT INTO owners VALUES (?, 'legacy')", (digest,))
    conn.close()
    FileBlobStore(store.registry_dir / "blobs").put(digest, data)

    reg = store.open()
    _check_legacy_readable(reg, digest, data)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(components)")}
    conn.close()
    assert "components_v1" not in tables and "record" not in columns
    store.close_all()
    store.opened.clear()
    assert len(store.open().get("legacy").versions) == 2  # opened again: nothing to migrate


def test_sqlite_index_of_a_newer_schema_is_refused(sqlite_store: Store) -> None:
    store = sqlite_store
    store.registry_dir.mkdir(parents=True)
    with sqlite3.connect(store.registry_dir / "index.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    with pytest.raises(StorageError, match="schema version 3"):
        store.open()


@pytest.mark.redis
def test_redis_whole_records_are_split_on_open(redis_store: Store) -> None:
    data = make_component(1).data
    digest, record = _legacy_record(data)
    assert redis_store.url is not None
    with redis.Redis.from_url(redis_store.url) as client:
        client.mset({"tmc:base": FP, "tmc:gen": 1, "tmc:c:legacy": record,
                     "tmc:owner:" + digest: "legacy", "tmc:blob:" + digest: data})
        client.sadd("tmc:ids", "legacy")
        reg = redis_store.open()
        head = json.loads(client.get("tmc:c:legacy") or b"")
        assert head == {"id": "legacy", "weight": 0.5, "active": True, "current": digest}
        assert client.get("tmc:schema") == b"2" and client.exists("tmc:detail:legacy")
        _check_legacy_readable(reg, digest, data)
        reg.forget("legacy")
        assert not client.exists("tmc:c:legacy", "tmc:detail:legacy")
