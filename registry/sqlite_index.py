"""The embedded index: one SQLite file in WAL mode, safe across processes on one machine.

Reads run in one deferred transaction (one WAL snapshot); writes run under
``BEGIN IMMEDIATE``. A component is one small row in ``components`` (the head columns
resolution reads, plus tags and created) and one row per version in ``versions`` (with
its metadata), so resolving never reads history or metadata. Schema version 2
(``PRAGMA user_version``); a version-1 file (one JSON ``record`` per id) is migrated when
opened, under the mutation lock, in one transaction.
``PRAGMA secure_delete`` zeroes deleted rows, and a ``wal_checkpoint(TRUNCATE)`` after
every deletion empties the WAL, so forgotten metadata does not linger in the files (a
reader in another process holding an old snapshot can defer the truncation to the next
checkpoint). Component bytes are never in SQLite: they are in a blob store (files in the
registry folder by default, or ``TMC_BLOB_URL``). The core deletes a forget's blobs right
after its commit and writes an add's blob right before, holding ``mutation_lock`` (a thread
lock + ``flock`` on ``registry.lock``: one lock for the whole registry) around both.
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
from registry.ports import Listener
from registry.records import (
    ComponentHead,
    ComponentRecord,
    VersionRecord,
    component_from_json,
    composition_from_json,
    composition_to_json,
)
from registry.types import NamedComposition

T = TypeVar("T")

SCHEMA_VERSION = 2
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS components (id TEXT PRIMARY KEY, weight REAL NOT NULL, "
    "active INTEGER NOT NULL, current TEXT NOT NULL, tags TEXT NOT NULL, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS versions (id TEXT NOT NULL, digest TEXT NOT NULL, "
    "seq INTEGER NOT NULL, created REAL NOT NULL, nbytes INTEGER NOT NULL, "
    "metadata TEXT NOT NULL, PRIMARY KEY (id, digest))",
    "CREATE TABLE IF NOT EXISTS owners (digest TEXT PRIMARY KEY, id TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS compositions (name TEXT PRIMARY KEY, record TEXT NOT NULL)",
)
HEAD_COLUMNS = "id, weight, active, current"
PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "foreign_keys=ON")


class SqliteTx:
    """A ``Tx`` over an open SQLite transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
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

    def _where_ids(self, ids: Sequence[str] | None) -> tuple[str, tuple[object, ...]]:
        if ids is None:
            return "", ()
        return " WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),)

    def heads(self, ids: Sequence[str] | None) -> dict[str, ComponentHead]:
        where, args = self._where_ids(ids)
        rows = self._conn.execute(f"SELECT {HEAD_COLUMNS} FROM components{where}", args)
        return {str(i): ComponentHead(str(i), float(w), bool(a), str(c)) for i, w, a, c in rows}

    def count_components(self) -> int:
        return int(self._value("SELECT COUNT(*) FROM components"))

    def component(self, cid: str) -> ComponentRecord | None:
        return self.components([cid]).get(cid)

    def components(self, ids: Sequence[str] | None) -> dict[str, ComponentRecord]:
        where, args = self._where_ids(ids)
        versions: dict[str, list[VersionRecord]] = {}
        try:
            for i, digest, created, nbytes, metadata in self._conn.execute(
                    "SELECT id, digest, created, nbytes, metadata FROM versions"
                    f"{where} ORDER BY id, seq", args):
                meta = {str(k): str(v) for k, v in json.loads(metadata).items()}
                versions.setdefault(i, []).append(
                    VersionRecord(str(digest), float(created), int(nbytes), meta))
            rows = self._conn.execute(
                f"SELECT {HEAD_COLUMNS}, tags, created FROM components{where}", args)
            return {str(i): ComponentRecord(
                str(i), float(w), tuple(str(t) for t in json.loads(tags)), bool(a),
                float(created), str(cur), tuple(versions.get(i, ())))
                for i, w, a, cur, tags, created in rows}
        except (ValueError, TypeError, AttributeError) as exc:
            raise StorageError(f"corrupt component record in the index: {exc}") from exc

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
        put_component(self._conn, rec)

    def delete_component(self, cid: str) -> None:
        self._exec("DELETE FROM versions WHERE id = ?", cid)
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
        """The core deletes the bytes after the commit, under the mutation lock."""

    def publish(self, message: str) -> None:
        """No push channel: other processes notice the generation change instead."""


def put_component(conn: sqlite3.Connection, rec: ComponentRecord) -> None:
    """Write the head row; versions are immutable, so only new ones are written."""
    conn.execute("INSERT OR REPLACE INTO components VALUES (?, ?, ?, ?, ?, ?)",
                 (rec.id, rec.weight, int(rec.active), rec.current, json.dumps(list(rec.tags)),
                  rec.created))
    conn.executemany(
        "INSERT OR IGNORE INTO versions VALUES (?, ?, ?, ?, ?, ?)",
        [(rec.id, v.digest, seq, v.created, v.nbytes,
          json.dumps(v.metadata, sort_keys=True, separators=(",", ":")))
         for seq, v in enumerate(rec.versions)])
    conn.execute("DELETE FROM versions WHERE id = ? AND digest NOT IN "
                 "(SELECT value FROM json_each(?))", (rec.id, json.dumps(rec.digests())))


def _migrate(conn: sqlite3.Connection) -> bool:
    """Bring the open transaction's file to SCHEMA_VERSION; whether rows were rewritten."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StorageError(f"the registry index is schema version {version}; this tmc reads "
                           f"up to {SCHEMA_VERSION}: upgrade tmc")
    if version == SCHEMA_VERSION:
        return False
    columns = {row[1] for row in conn.execute("PRAGMA table_info(components)")}
    legacy = "record" in columns  # version 1: components (id, record JSON)
    if legacy:
        conn.execute("ALTER TABLE components RENAME TO components_v1")
    for statement in SCHEMA:
        conn.execute(statement)
    if legacy:
        for (text,) in conn.execute("SELECT record FROM components_v1").fetchall():
            put_component(conn, component_from_json(text))
        conn.execute("DROP TABLE components_v1")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return legacy


class SqliteIndex:
    """An ``Index`` in ``<dir>/index.sqlite3``; the bytes live in a separate blob store."""

    holds_blobs = False

    def __init__(self, directory: Path) -> None:
        self.path = directory / "index.sqlite3"
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
                migrated = self._run("BEGIN IMMEDIATE", lambda tx: _migrate(self._conn))[0]
                if migrated:
                    self._checkpoint()  # the old records' pages are zeroed (secure_delete)
        except (sqlite3.Error, StorageError) as exc:
            self.close()
            if isinstance(exc, StorageError):
                raise
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

    def mutate(self, fn: Callable[[SqliteTx], T],
               then: Callable[[T], object] | None = None) -> T:
        result, tx = self._run("BEGIN IMMEDIATE", fn)
        try:
            if then is not None:
                then(result)  # e.g. the blob deletes, which free disk space first
        finally:
            if tx.deleted:
                self._checkpoint()
        return result

    def _checkpoint(self) -> None:
        """Move the WAL into the (secure-deleted) main file and truncate it; a reader in
        another process may make it wait for the next one (busy)."""
        with self._conn_lock:
            try:
                for _ in range(5):
                    busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                    if not busy:
                        return
            except sqlite3.Error as exc:
                raise StorageError(f"registry index {self.path}: the change is committed, but "
                                   f"its WAL could not be checkpointed: {exc}") from exc

    @contextmanager
    def mutation_lock(self, digests: Sequence[str] = (), *, wait: bool = True
                      ) -> Iterator[None]:
        """One lock for the whole registry, whatever the digests (always waits)."""
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
