"""The shared backend: index, generation and component bytes in one Redis.

Key layout (``P`` is the key prefix, ``tmc:`` by default; one Redis database per base):

    P gen               string   the registry generation (INCRements with every change)
    P base              string   the base fingerprint this registry belongs to
    P ids               set      every registered component id
    P c:<id>            string   the component record (JSON: settings + versions + metadata)
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
Keys are built from validated ids and hex digests only. Not for Redis Cluster (keys span
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
    ComponentRecord,
    component_from_json,
    component_to_json,
    composition_from_json,
    composition_to_json,
)
from registry.redis_events import RedisListener
from registry.snapshot import SnapshotTx
from registry.types import NamedComposition
from registry.validate import DIGEST_PATTERN

T = TypeVar("T")
MAX_ATTEMPTS = 200
OPTIMISTIC_READS = 3
SNAPSHOT_LUA = """
local p = ARGV[1]
local records = {}
for _, id in ipairs(redis.call('SMEMBERS', p .. 'ids')) do
  records[#records + 1] = redis.call('GET', p .. 'c:' .. id)
end
return {redis.call('GET', p .. 'gen') or '0', records, redis.call('HVALS', p .. 'comps')}
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

    def generation(self) -> int:
        return int(self._p.get(self._k.gen) or 0)

    def base_fingerprint(self) -> str | None:
        value = self._p.get(self._k.base)
        return None if value is None else _text(value)

    def component(self, cid: str) -> ComponentRecord | None:
        text = self._p.get(self._k.component(cid))
        return None if text is None else component_from_json(text)

    def components(self, ids: Sequence[str] | None) -> dict[str, ComponentRecord]:
        if ids is None:
            ids = sorted(_text(i) for i in self._p.smembers(self._k.ids))
        texts = self._p.mget([self._k.component(i) for i in ids]) if ids else []
        records = [component_from_json(t) for t in texts if t is not None]
        return {r.id: r for r in records}

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
        text = component_to_json(rec)
        self._stage(lambda p: p.set(self._k.component(rec.id), text))
        self._stage(lambda p: p.sadd(self._k.ids, rec.id))

    def delete_component(self, cid: str) -> None:
        self._stage(lambda p: p.delete(self._k.component(cid)))
        self._stage(lambda p: p.srem(self._k.ids, cid))

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
            gen, texts, comps = self._snapshot_script(args=[self.keys.prefix])
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc
        records = [component_from_json(t) for t in texts]
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
