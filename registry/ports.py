"""The two storage ports the registry core runs on, and the transaction view of the index.

``Index`` keeps metadata, the generation and named compositions; ``BlobStore`` keeps
component bytes by digest. The core writes a blob BEFORE the index row that references it,
so a crash leaves at most an unreferenced blob, which ``sweep`` removes.

Bytes and index may live in different stores (``Index.holds_blobs`` False): then a blob
write + the index change that references it, and an index change + the blob delete it
implies, each run under ``Index.mutation_lock(digests)`` (SQLite: one lock for the whole
registry; Redis: a lease per digest), so a sweep or forget never deletes bytes that an add
is about to reference. When the index holds the bytes too (Redis bytes in the same Redis),
the index change and the blob delete are one atomic unit and the lock is not needed.

Every index change runs as ``Index.mutate(fn)``: ``fn`` reads through the ``Tx`` it is given,
then stages writes; the backend applies them atomically (SQLite ``BEGIN IMMEDIATE``; Redis
``WATCH``/``MULTI``/``EXEC``, re-running ``fn`` when a concurrent change wins). ``fn`` must
do all its reads before its first write and must have no side effects outside the ``Tx``.
``Index.read(fn)`` runs ``fn`` against one consistent snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from registry.records import ComponentHead, ComponentRecord
from registry.types import NamedComposition

T = TypeVar("T")


class Tx(Protocol):
    """One atomic unit of index reads and staged writes."""

    def generation(self) -> int: ...
    def component(self, cid: str) -> ComponentRecord | None: ...
    def components(self, ids: Sequence[str] | None) -> dict[str, ComponentRecord]:
        """The records of ``ids`` that exist (every record when ``ids`` is None)."""
    def heads(self, ids: Sequence[str] | None) -> dict[str, ComponentHead]:
        """The heads of ``ids`` that exist (every head when ``ids`` is None): reads no tags,
        version history or metadata, so its cost does not grow with them (resolution)."""
    def count_components(self) -> int:
        """How many ids are registered, without reading any record."""
    def owner(self, digest: str) -> str | None: ...
    def composition(self, name: str) -> NamedComposition | None: ...
    def compositions(self) -> dict[str, NamedComposition]: ...
    def base_fingerprint(self) -> str | None: ...

    def put_component(self, rec: ComponentRecord) -> None: ...
    def delete_component(self, cid: str) -> None: ...
    def set_owner(self, digest: str, cid: str) -> None: ...
    def delete_owner(self, digest: str) -> None: ...
    def put_composition(self, comp: NamedComposition) -> None: ...
    def delete_composition(self, name: str) -> None: ...
    def set_generation(self, generation: int) -> None: ...
    def set_base_fingerprint(self, fingerprint: str) -> None: ...

    def require_blob(self, digest: str) -> None:
        """Where the index holds the bytes: raise BlobMissingError unless they are stored,
        as part of this unit. Elsewhere: nothing (the core wrote them under the lock)."""
    def drop_blob(self, digest: str) -> None:
        """Where the index holds the bytes: delete them in this unit. Elsewhere: nothing
        (the core deletes them right after the commit, still under the mutation lock)."""
    def publish(self, message: str) -> None:
        """Announce the change to other processes when committed (no-op if unsupported)."""


class Listener(Protocol):
    """A running subscription to other processes' change announcements."""

    def close(self) -> None: ...


class Index(Protocol):
    """Component metadata, versions, named compositions and the generation counter."""

    holds_blobs: bool  # the bytes live in the index's own store (one atomic unit)

    def read(self, fn: Callable[[Tx], T]) -> T: ...
    def mutate(self, fn: Callable[[Tx], T], then: Callable[[T], object] | None = None) -> T:
        """Apply ``fn`` atomically; then ``then(result)`` (the core's blob deletes), right
        after the commit and before the index's own housekeeping (SQLite's WAL checkpoint,
        which needs the disk space the deletes free); its error propagates."""
    def mutation_lock(self, digests: Sequence[str] = (), *,
                      wait: bool = True) -> AbstractContextManager[None]:
        """Held around blob write + index change (and index change + blob delete) of
        ``digests``. With ``wait`` False, raise BusyError at once if another holds one."""
    def listen(self, on_message: Callable[[str], None]) -> Listener | None:
        """Subscribe to other processes' ``Tx.publish`` messages (None: not supported)."""
    def ping(self) -> None: ...
    def close(self) -> None: ...


class BlobStore(Protocol):
    """Bytes by sha256 hex digest. Content-addressed, so ``put`` is idempotent."""

    def put(self, digest: str, data: bytes) -> None: ...
    def get(self, digest: str) -> bytes | None: ...
    def delete(self, digest: str) -> None: ...
    def exists(self, digest: str) -> bool: ...
    def digests(self) -> Iterator[str]: ...
    def discard_partial(self) -> None:
        """Remove leftovers of interrupted puts; call under the index's mutation lock."""
    def close(self) -> None: ...
