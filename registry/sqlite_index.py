"""The embedded index: one SQLite file in WAL mode, safe across processes on one machine.

Reads run in one deferred transaction (one WAL snapshot); writes run under
``BEGIN IMMEDIATE``. Records are the same JSON documents the Redis backend stores.
``PRAGMA secure_delete`` zeroes deleted rows, and a ``wal_checkpoint(TRUNCATE)`` after
every deletion empties the WAL, so forgotten metadata does not linger in the files (a
reader in another process holding an old snapshot can defer the truncation to the next
checkpoint). Component bytes are never in SQLite: they are blob files.
Blob deletions staged by a transaction (``drop_blob``) run right after its commit; the
core holds ``mutation_lock`` (a thread lock + ``flock`` on ``registry.lock``) around them.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from registry.errors import StorageError
from registry.ports import BlobStore, Listener
from registry.records import (
    ComponentRecord,
    component_from_json,
    component_to_json,
    composition_from_json,
    composition_to_json,
)
from registry.types import NamedComposition

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS components (id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS owners (digest TEXT PRIMARY KEY, id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS compositions (name TEXT PRIMARY KEY, record TEXT NOT NULL);
"""
PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "foreign_keys=ON")


class SqliteTx:
    """A ``Tx`` over an open SQLite transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.dropped: list[str] = []
        self.deleted = False

    def _value(self, sql: str, *args: object) -> Any:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def _meta(self, key: str) -> str | None:
        value: str | None = self._value("SELECT value FROM meta WHERE key = ?", key)
        return value

    def generation(self) -> int:
        return int(self._meta("generation") or 0)

    def base_fingerprint(self) -> str | None:
        return self._meta("base_fingerprint")

    def component(self, cid: str) -> ComponentRecord | None:
        text = self._value("SELECT record FROM components WHERE id = ?", cid)
        return None if text is None else component_from_json(text)

    def components(self, ids: Sequence[str] | None) -> dict[str, ComponentRecord]:
        if ids is None:
            rows = self._conn.execute("SELECT record FROM components")
        else:
            rows = self._conn.execute(
                "SELECT record FROM components WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(ids)),))
        records = [component_from_json(text) for (text,) in rows]
        return {r.id: r for r in records}

    def owner(self, digest: str) -> str | None:
        owner: str | None = self._value("SELECT id FROM owners WHERE digest = ?", digest)
        return owner

    def composition(self, name: str) -> NamedComposition | None:
        text = self._value("SELECT record FROM compositions WHERE name = ?", name)
        return None if text is None else composition_from_json(text)

    def compositions(self) -> dict[str, NamedComposition]:
        rows = self._conn.execute("SELECT record FROM compositions")
        comps = [composition_from_json(text) for (text,) in rows]
        return {c.name: c for c in comps}

    def _exec(self, sql: str, *args: object) -> None:
        self._conn.execute(sql, args)

    def put_component(self, rec: ComponentRecord) -> None:
        self._exec("INSERT OR REPLACE INTO components VALUES (?, ?)", rec.id,
                   component_to_json(rec))

    def delete_component(self, cid: str) -> None:
        self._exec("DELETE FROM components WHERE id = ?", cid)
        self.deleted = True

    def set_owner(self, digest: str, cid: str) -> None:
        self._exec("INSERT OR REPLACE INTO owners VALUES (?, ?)", digest, cid)

    def delete_owner(self, digest: str) -> None:
        self._exec("DELETE FROM owners WHERE digest = ?", digest)

    def put_composition(self, comp: NamedComposition) -> None:
        self._exec("INSERT OR REPLACE INTO compositions VALUES (?, ?)", comp.name,
                   composition_to_json(comp))
        self.deleted = True  # the old document's bytes are freed

    def delete_composition(self, name: str) -> None:
        self._exec("DELETE FROM compositions WHERE name = ?", name)
        self.deleted = True

    def set_generation(self, generation: int) -> None:
        self._exec("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", str(generation))

    def set_base_fingerprint(self, fingerprint: str) -> None:
        self._exec("INSERT OR REPLACE INTO meta VALUES ('base_fingerprint', ?)", fingerprint)

    def require_blob(self, digest: str) -> None:
        """The core wrote the blob under the mutation lock; nothing can have removed it."""

    def drop_blob(self, digest: str) -> None:
        self.dropped.append(digest)

    def publish(self, message: str) -> None:
        """No push channel: other processes notice the generation change instead."""


class SqliteIndex:
    """An ``Index`` in ``<dir>/index.sqlite3``, deleting blobs in ``blobs`` after commit."""

    def __init__(self, directory: Path, blobs: BlobStore) -> None:
        self.path = directory / "index.sqlite3"
        self._blobs = blobs
        self._conn_lock = threading.RLock()
        self._write_lock = threading.Lock()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(directory / "registry.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the registry in {directory}: {exc}") from exc
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise StorageError(f"cannot open the registry index {self.path}: {exc}") from exc
        self._setup()

    def _setup(self) -> None:
        try:
            for pragma in PRAGMAS:
                self._conn.execute(f"PRAGMA {pragma}")
            with self.mutation_lock():
                self._conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            self.close()
            raise StorageError(f"cannot initialise the registry index {self.path}: {exc}") from exc

    def _run(self, begin: str, fn: Callable[[SqliteTx], T]) -> tuple[T, SqliteTx]:
        with self._conn_lock:
            try:
                self._conn.execute(begin)
                tx = SqliteTx(self._conn)
                try:
                    result = fn(tx)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                return result, tx
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise StorageError(f"registry index {self.path}: {exc}") from exc

    def read(self, fn: Callable[[SqliteTx], T]) -> T:
        return self._run("BEGIN", fn)[0]

    def mutate(self, fn: Callable[[SqliteTx], T]) -> T:
        result, tx = self._run("BEGIN IMMEDIATE", fn)
        for digest in tx.dropped:
            self._blobs.delete(digest)
        if tx.deleted:
            self._checkpoint()
        return result

    def _checkpoint(self) -> None:
        """Move the WAL into the (secure-deleted) main file and truncate it; best effort."""
        with self._conn_lock:
            for _ in range(5):
                busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if not busy:
                    return

    @contextmanager
    def mutation_lock(self) -> Iterator[None]:
        with self._write_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def listen(self, on_message: Callable[[str], None]) -> Listener | None:
        return None

    def ping(self) -> None:
        self.read(lambda tx: tx.generation())

    def close(self) -> None:
        with self._conn_lock:
            self._conn.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
