"""The shared backend: index, generation and component bytes in one Redis.

Key layout (``P`` is the key prefix, ``tmc:`` by default; one Redis database per base):

    P gen               string   the registry generation (INCRements with every change)
    P base              string   the base fingerprint this registry belongs to
    P ids               set      every registered component id
    P c:<id>            string   the component's head (JSON: id, weight, active, current):
                                 all that resolution reads, whatever the history/metadata
    P detail:<id>       string   the rest of its record (JSON: tags, created, every version
                                 with its metadata); read by get/list and by changes only
    P schema            string   "2" once whole-record ``c:<id>`` documents (schema 1) are split
    P owner:<digest>    string   the id that owns a version digest (a digest has one owner)
    P blob:<digest>     string   the component bytes of that version
    P comps             hash     composition name -> composition record (JSON)
    P events            channel  pub/sub: one JSON message per change {"generation", "forgotten"}

Changes are optimistic transactions: WATCH ``P gen`` (every change rewrites it), read, then
MULTI/EXEC the staged writes together with the new generation and the PUBLISH; a concurrent
change aborts the EXEC and the change is re-run. So no reader ever sees half a change, and a
forget deletes the index entries and the bytes in the same EXEC. Reads WATCH ``P gen`` too and
confirm with an EXEC; a read that keeps losing to writers falls back to one Lua call that
copies the index metadata atomically. Either way every read is one consistent snapshot.
A Redis that restarts empty (no persistence) or is flushed loses ``P base`` and resets
``P gen``: replicas notice through ``RedisIndex.marks`` and refuse compositions until the data
is restored (registry.core, "Lost-store policy"). Keys are built from validated ids and hex
digests only. Not for Redis Cluster (keys span
slots). With RDB/AOF persistence on, forgotten bytes stay in old snapshots until rewritten.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.client import Pipeline

from registry.errors import BlobMissingError, RegistryError, StorageError
from registry.records import (
    ComponentHead,
    ComponentRecord,
    component_from_json,
    component_from_parts,
    composition_from_json,
    composition_to_json,
    detail_to_json,
    head_from_json,
    head_to_json,
    is_whole_record,
)
from registry.redis_events import RedisListener
from registry.snapshot import SnapshotTx
from registry.types import NamedComposition
from registry.validate import DIGEST_PATTERN

T = TypeVar("T")
MAX_ATTEMPTS = 200
SCHEMA_VERSION = 2
OPTIMISTIC_READS = 3
SNAPSHOT_LUA = """
local p = ARGV[1]
local records = {}
local details = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'ids')) do
  records[#records + 1] = redis.call('GET', p .. 'c:' .. id)
  details[#details + 1] = redis.call('GET', p .. 'detail:' .. id) or ''
end
return {redis.call('GET', p .. 'gen') or '0', records, redis.call('HVALS', p .. 'comps'),
        details}
"""
Op = Callable[[Pipeline], object]


@dataclass(frozen=True)
class Keys:
    prefix: str = "tmc:"

    def __getattr__(self, name: str) -> str:  # gen, base, ids, comps, events
        if name.startswith("_"):
            raise AttributeError(name)
        return self.prefix + name

    def component(self, cid: str) -> str:
        return f"{self.prefix}c:{cid}"

    def detail(self, cid: str) -> str:
        return f"{self.prefix}detail:{cid}"

    def owner(self, digest: str) -> str:
        return f"{self.prefix}owner:{digest}"

    def blob(self, digest: str) -> str:
        return f"{self.prefix}blob:{digest}"


class _Retry(Exception):
    """A read saw a change in flight: run the unit again."""


class _Lost:
    """Every attempt lost to a concurrent change."""


LOST = _Lost()


class RedisTx:
    """A ``Tx``: immediate reads on a watching pipeline, writes staged for MULTI/EXEC."""

    def __init__(self, pipe: Pipeline, keys: Keys) -> None:
        self._p = pipe
        self._k = keys
        self.ops: list[Op] = []
        self._details: dict[str, str] = {}  # detail documents read: unchanged ones aren't rewritten

    def generation(self) -> int:
        return int(self._p.get(self._k.gen) or 0)

    def base_fingerprint(self) -> str | None:
        value = self._p.get(self._k.base)
        return None if value is None else _text(value)

    def component(self, cid: str) -> ComponentRecord | None:
        return self.components([cid]).get(cid)

    def _ids(self, ids: Sequence[str] | None) -> list[str]:
        if ids is None:
            return sorted(_text(i) for i in self._p.smembers(self._k.ids))
        return list(ids)

    def components(self, ids: Sequence[str] | None) -> dict[str, ComponentRecord]:
        wanted = self._ids(ids)
        if not wanted:
            return {}
        texts = self._p.mget([self._k.component(i) for i in wanted]
                             + [self._k.detail(i) for i in wanted])
        records = {}
        for cid, head, detail in zip(wanted, texts, texts[len(wanted):], strict=False):
            if head is not None:
                if detail is not None:
                    self._details[cid] = _text(detail)
                records[cid] = component_from_parts(head, detail)
        return records

    def heads(self, ids: Sequence[str] | None) -> dict[str, ComponentHead]:
        wanted = self._ids(ids)
        texts = self._p.mget([self._k.component(i) for i in wanted]) if wanted else []
        heads = [head_from_json(t) for t in texts if t is not None]
        return {h.id: h for h in heads}

    def count_components(self) -> int:
        return int(self._p.scard(self._k.ids))

    def owner(self, digest: str) -> str | None:
        value = self._p.get(self._k.owner(digest))
        return None if value is None else _text(value)

    def composition(self, name: str) -> NamedComposition | None:
        text = self._p.hget(self._k.comps, name)
        return None if text is None else composition_from_json(text)

    def compositions(self) -> dict[str, NamedComposition]:
        texts = self._p.hvals(self._k.comps)
        comps = [composition_from_json(t) for t in texts]
        return {c.name: c for c in comps}

    def _stage(self, op: Op) -> None:
        self.ops.append(op)

    def put_component(self, rec: ComponentRecord) -> None:
        head, detail = head_to_json(rec), detail_to_json(rec)
        self._stage(lambda p: p.set(self._k.component(rec.id), head))
        if self._details.get(rec.id) != detail:
            self._stage(lambda p: p.set(self._k.detail(rec.id), detail))
        self._stage(lambda p: p.sadd(self._k.ids, rec.id))

    def delete_component(self, cid: str) -> None:
        self._stage(lambda p: p.delete(self._k.component(cid), self._k.detail(cid)))
        self._stage(lambda p: p.srem(self._k.ids, cid))

    def split_whole_records(self) -> None:
        """Schema 1 → 2: rewrite whole-record ``c:<id>`` documents as head + detail."""
        if self._p.get(self._k.schema) is not None:
            return
        ids = self._ids(None)
        for text in self._p.mget([self._k.component(i) for i in ids]) if ids else []:
            if text is not None and is_whole_record(text):
                self.put_component(component_from_json(text))
        self._stage(lambda p: p.set(self._k.schema, SCHEMA_VERSION))

    def set_owner(self, digest: str, cid: str) -> None:
        self._stage(lambda p: p.set(self._k.owner(digest), cid))

    def delete_owner(self, digest: str) -> None:
        self._stage(lambda p: p.delete(self._k.owner(digest)))

    def put_composition(self, comp: NamedComposition) -> None:
        text = composition_to_json(comp)
        self._stage(lambda p: p.hset(self._k.comps, comp.name, text))

    def delete_composition(self, name: str) -> None:
        self._stage(lambda p: p.hdel(self._k.comps, name))

    def set_generation(self, generation: int) -> None:
        self._stage(lambda p: p.set(self._k.gen, generation))

    def set_base_fingerprint(self, fingerprint: str) -> None:
        self._stage(lambda p: p.set(self._k.base, fingerprint))

    def require_blob(self, digest: str) -> None:
        # watched: a sweep deleting the blob from now on aborts this unit's EXEC
        self._p.watch(self._k.blob(digest))  # type: ignore[no-untyped-call]
        if not self._p.exists(self._k.blob(digest)):
            raise BlobMissingError(f"blob {digest} vanished before its index entry was written")

    def drop_blob(self, digest: str) -> None:
        self._stage(lambda p: p.delete(self._k.blob(digest)))

    def publish(self, message: str) -> None:
        self._stage(lambda p: p.publish(self._k.events, message))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _storage_error(exc: redis.RedisError) -> StorageError:
    return StorageError(f"Redis registry unavailable: {type(exc).__name__}: {exc}")


class RedisIndex:
    """An ``Index`` in Redis; owns the client it is given."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self.keys = keys
        self._snapshot_script = client.register_script(SNAPSHOT_LUA)
        self._schema_checked = False

    def _check_schema(self) -> None:
        """Once per process: split schema-1 whole records (``RedisTx.split_whole_records``)."""
        self._schema_checked = True
        try:
            if isinstance(self._run(RedisTx.split_whole_records, MAX_ATTEMPTS), _Lost):
                raise StorageError(f"Redis registry too busy: {MAX_ATTEMPTS} attempts lost")
        except BaseException:
            self._schema_checked = False
            raise

    def _attempt(self, fn: Callable[[RedisTx], T]) -> T:
        with self._client.pipeline(transaction=True) as pipe:
            pipe.watch(self.keys.gen)  # type: ignore[no-untyped-call]
            tx = RedisTx(pipe, self.keys)
            start = tx.generation()
            try:
                result = fn(tx)
            except RegistryError:
                if tx.generation() != start:
                    raise _Retry() from None  # the error may come from a torn read
                raise
            pipe.multi()
            for op in tx.ops:
                op(pipe)
            pipe.get(self.keys.gen)  # EXEC fails if anything watched changed
            pipe.execute()
            return result

    def _run(self, fn: Callable[[RedisTx], T], attempts: int) -> T | _Lost:
        if not self._schema_checked:
            self._check_schema()
        for attempt in range(attempts):
            try:
                return self._attempt(fn)
            except (redis.WatchError, _Retry):
                time.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
            except redis.RedisError as exc:
                raise _storage_error(exc) from exc
        return LOST

    def read(self, fn: Callable[[SnapshotTx | RedisTx], T]) -> T:
        """Optimistic reads first; if writers keep winning, one atomic Lua snapshot."""
        result = self._run(fn, OPTIMISTIC_READS)
        return fn(self._snapshot()) if isinstance(result, _Lost) else result

    def mutate(self, fn: Callable[[RedisTx], T]) -> T:
        result = self._run(fn, MAX_ATTEMPTS)
        if isinstance(result, _Lost):
            raise StorageError(f"Redis registry too busy: {MAX_ATTEMPTS} attempts lost")
        return result

    def _snapshot(self) -> SnapshotTx:
        try:
            gen, texts, comps, details = self._snapshot_script(args=[self.keys.prefix])
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc
        records = [component_from_parts(t, d or None) for t, d in zip(texts, details, strict=True)]
        named = [composition_from_json(t) for t in comps]
        return SnapshotTx(int(gen), {r.id: r for r in records}, {c.name: c for c in named})

    def mutation_lock(self) -> AbstractContextManager[None]:
        return nullcontext()  # WATCH + require_blob make every unit safe on its own

    def listen(self, on_message: Callable[[str], None]) -> RedisListener:
        try:
            return RedisListener(self._client, self.keys.events, on_message)
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc

    def ping(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc

    def marks(self) -> tuple[int, str | None]:
        """The generation and the base fingerprint, read together (one MGET: atomic).

        The core's lost-store check: after Redis restarts empty both are gone
        (the generation reads 0)."""
        try:
            gen, base = self._client.mget([self.keys.gen, self.keys.base])
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc
        return int(gen or 0), None if base is None else _text(base)

    def close(self) -> None:
        self._client.close()


class RedisBlobStore:
    """A ``BlobStore`` in the same Redis: ``P blob:<digest>``."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc

    def put(self, digest: str, data: bytes) -> None:
        self._call(lambda: self._client.set(self._keys.blob(digest), data))

    def get(self, digest: str) -> bytes | None:
        value = self._call(lambda: self._client.get(self._keys.blob(digest)))
        return None if value is None else bytes(value)

    def delete(self, digest: str) -> None:
        self._call(lambda: self._client.delete(self._keys.blob(digest)))

    def exists(self, digest: str) -> bool:
        return bool(self._call(lambda: self._client.exists(self._keys.blob(digest))))

    def digests(self) -> Iterator[str]:
        start = len(self._keys.blob(""))
        keys = self._call(lambda: list(self._client.scan_iter(self._keys.blob("*"), 1000)))
        for key in keys:
            digest = bytes(key)[start:].decode()
            if DIGEST_PATTERN.fullmatch(digest):
                yield digest

    def discard_partial(self) -> None:
        """A SET is all or nothing: no partial blobs."""

    def close(self) -> None:
        """The client belongs to the index."""
