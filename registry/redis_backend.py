"""The shared backend: index and generation in Redis; component bytes there too, or elsewhere.

The key layout and the transaction view (``RedisTx``) are in ``registry.redis_tx``.

Changes are optimistic transactions: WATCH ``P gen`` (every change rewrites it), read, then
MULTI/EXEC the staged writes together with the new generation and the PUBLISH; a concurrent
change aborts the EXEC and the change is re-run. So no reader ever sees half a change, and a
forget deletes the index entries and the bytes in the same EXEC when the bytes are in Redis.

Bytes elsewhere (``TMC_BLOB_URL`` file:// or s3://; ``holds_blobs`` False): the core deletes
them right after the EXEC, so what made the WATCH on ``P blob:<digest>`` safe must come from
somewhere else. The race: replica A writes the bytes of a new version, replica B's sweep (run
at every open) lists them, finds no owner and deletes them, and A's index entry then points
at nothing; likewise a forget's delete landing after another replica re-added the same bytes.
``mutation_lock(digests)`` takes a lease per digest (``SET P lease:<d> <token> NX PX``):
an add holds it from its blob write to its EXEC, a forget and a sweep from their EXEC to the
blob delete, so those never interleave on one digest (the SQLite backend's file lock, per
digest and across machines). A holder that dies frees the digest after LEASE_TTL_S; every
EXEC under leases WATCHes them and checks their tokens first, so a holder whose lease expired
(stalled past LEASE_TTL_S) cannot commit. The one window left: a delete that starts more
than LEASE_TTL_S after its EXEC (S3 calls time out long before that). Reads WATCH ``P gen`` too and
confirm with an EXEC; a read that keeps losing to writers falls back to one Lua call that
copies the index metadata atomically. Either way every read is one consistent snapshot.
A Redis that restarts empty (no persistence) or is flushed loses ``P base`` and resets
``P gen``: replicas notice through ``RedisIndex.marks`` and refuse compositions until the data
is restored (registry.lost_store). Keys are built from validated ids and hex
digests only. Not for Redis Cluster (keys span
slots). With RDB/AOF persistence on, forgotten bytes stay in old snapshots until rewritten.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import redis
from redis.client import Pipeline

from registry.errors import BusyError, RegistryError, StorageError
from registry.records import component_from_parts, composition_from_json
from registry.redis_events import RedisListener
from registry.redis_tx import Keys, RedisTx, text
from registry.snapshot import SnapshotTx
from registry.validate import DIGEST_PATTERN

log = logging.getLogger(__name__)
T = TypeVar("T")
LEASE_TTL_S = 300.0  # a dead holder frees its digests after this; a live one must finish
LEASE_WAIT_S = 60.0  # how long an add/forget waits for another's lease on the same digest
MAX_ATTEMPTS = 200
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
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Retry(Exception):
    """A read saw a change in flight: run the unit again."""


class _Lost:
    """Every attempt lost to a concurrent change."""


LOST = _Lost()


def _storage_error(exc: redis.RedisError) -> StorageError:
    if isinstance(exc, redis.exceptions.OutOfMemoryError):  # reachable, but refuses writes
        return StorageError(
            f"the Redis registry is full (maxmemory reached; nothing was changed): {exc}. "
            "Raise Redis's maxmemory, or keep component bytes out of Redis "
            "(TMC_BLOB_URL=s3://… or file://…) so it holds the index only")
    return StorageError(f"Redis registry unavailable: {type(exc).__name__}: {exc}")


class RedisIndex:
    """An ``Index`` in Redis; owns the client it is given."""

    def __init__(self, client: redis.Redis, keys: Keys, *, holds_blobs: bool = True) -> None:
        self._client = client
        self.keys = keys
        self.holds_blobs = holds_blobs
        self._snapshot_script = client.register_script(SNAPSHOT_LUA)
        self._release_script = client.register_script(RELEASE_LUA)
        self._leases = threading.local()  # digest -> token, the leases this thread holds
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
            self._check_leases(pipe)
            tx = RedisTx(pipe, self.keys, self.holds_blobs)
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

    def mutate(self, fn: Callable[[RedisTx], T],
               then: Callable[[T], object] | None = None) -> T:
        result = self._run(fn, MAX_ATTEMPTS)
        if isinstance(result, _Lost):
            raise StorageError(f"Redis registry too busy: {MAX_ATTEMPTS} attempts lost")
        if then is not None:
            then(result)
        return result

    def _snapshot(self) -> SnapshotTx:
        try:
            gen, texts, comps, details = self._snapshot_script(args=[self.keys.prefix])
        except redis.RedisError as exc:
            raise _storage_error(exc) from exc
        records = [component_from_parts(t, d or None) for t, d in zip(texts, details, strict=True)]
        named = [composition_from_json(t) for t in comps]
        return SnapshotTx(int(gen), {r.id: r for r in records}, {c.name: c for c in named})

    def mutation_lock(self, digests: Sequence[str] = (), *,
                      wait: bool = True) -> AbstractContextManager[None]:
        """Bytes in Redis: nothing (WATCH + require_blob make every unit safe on its own).
        Bytes elsewhere: a lease on each of ``digests`` (see the module docstring)."""
        if self.holds_blobs or not digests:
            return nullcontext()
        return self._leased(sorted(set(digests)), wait)

    def _held(self) -> dict[str, str]:
        held: dict[str, str] | None = getattr(self._leases, "held", None)
        if held is None:
            held = self._leases.held = {}
        return held

    @contextmanager
    def _leased(self, digests: list[str], wait: bool) -> Iterator[None]:
        held = self._held()
        taken: list[str] = []
        try:
            for digest in digests:
                if digest not in held:
                    held[digest] = self._acquire(digest, wait)
                    taken.append(digest)
            yield
        finally:
            for digest in taken:
                self._release(digest, held.pop(digest))

    def _acquire(self, digest: str, wait: bool) -> str:
        """Take the lease on ``digest`` (waiting up to LEASE_WAIT_S if ``wait``)."""
        token, key = secrets.token_hex(16), self.keys.lease(digest)
        deadline = time.monotonic() + (LEASE_WAIT_S if wait else 0.0)
        delay = 0.002
        while True:
            try:
                if self._client.set(key, token, nx=True, px=int(LEASE_TTL_S * 1000)):
                    return token
            except redis.RedisError as exc:
                raise _storage_error(exc) from exc
            if time.monotonic() >= deadline:
                raise BusyError(
                    f"version {digest} is being written or deleted by another replica (lease "
                    f"{key} held); retry in a moment (a dead holder's lease expires after "
                    f"{LEASE_TTL_S:.0f} s)")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _release(self, digest: str, token: str) -> None:
        try:
            self._release_script(keys=[self.keys.lease(digest)], args=[token])
        except redis.RedisError:  # it expires on its own; nothing was left half-done
            log.warning("could not release the lease on %s; it expires in %.0f s",
                        digest, LEASE_TTL_S)

    def _check_leases(self, pipe: Pipeline) -> None:
        """Fencing: WATCH this thread's leases and refuse to go on if one was lost."""
        held = self._held()
        if not held:
            return
        digests = sorted(held)
        keys = [self.keys.lease(d) for d in digests]
        pipe.watch(*keys)  # type: ignore[no-untyped-call]
        for digest, value in zip(digests, pipe.mget(keys), strict=True):
            if value is None or text(value) != held[digest]:
                raise StorageError(
                    f"lost the lease on version {digest} (held longer than {LEASE_TTL_S:.0f} "
                    "s, or Redis lost it): nothing was changed; retry")

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
        return int(gen or 0), None if base is None else text(base)

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
        start = len(self._keys.blob_pattern()) - 1
        keys = self._call(lambda: list(self._client.scan_iter(self._keys.blob_pattern(), 1000)))
        for key in keys:
            digest = bytes(key)[start:].decode()
            if DIGEST_PATTERN.fullmatch(digest):
                yield digest

    def discard_partial(self) -> None:
        """A SET is all or nothing: no partial blobs."""

    def close(self) -> None:
        """The client belongs to the index."""
