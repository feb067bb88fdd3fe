"""A replica's local byte cache by digest (shared bytes: a Redis index or s3:// bytes), verified
by sha256 on every hit.

Backed by a folder (``FileBlobStore``, atomic writes) or by memory (``MemoryBlobStore``,
LRU-bounded). The registry purges it on forget, on a forget announced by another replica,
and whenever the index no longer references a digest it is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from registry.errors import StorageError
from registry.ports import BlobStore
from registry.types import StorePurge

log = logging.getLogger(__name__)
DEFAULT_MEMORY_BYTES = 1 << 30


class MemoryBlobStore:
    """An in-memory ``BlobStore`` that evicts least-recently-used blobs past ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, digest: str, data: bytes) -> None:
        with self._lock:
            self._size += len(data) - len(self._blobs.pop(digest, b""))
            self._blobs[digest] = data
            while self._size > self.max_bytes:
                self._size -= len(self._blobs.popitem(last=False)[1])

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            data = self._blobs.get(digest)
            if data is not None:
                self._blobs.move_to_end(digest)
            return data

    def delete(self, digest: str) -> None:
        with self._lock:
            self._size -= len(self._blobs.pop(digest, b""))

    def exists(self, digest: str) -> bool:
        with self._lock:
            return digest in self._blobs

    def digests(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._blobs))

    def discard_partial(self) -> None:
        """Nothing is ever partial in memory."""

    def close(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._size = 0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalCache:
    """Verified bytes by digest: a hit whose sha256 does not match is deleted, not served."""

    def __init__(self, store: BlobStore, kind: str = "memory", where: str = "memory") -> None:
        self.store = store
        self.kind, self.where = kind, where  # "file", "/var/cache/tmc" / "memory", "memory"

    def get(self, digest: str) -> bytes | None:
        data = self.store.get(digest)
        if data is None:
            return None
        if sha256_hex(data) != digest:
            log.warning("local cache entry %s is corrupt; dropped", digest)
            self.store.delete(digest)
            return None
        return data

    def put(self, digest: str, data: bytes) -> None:
        """Best effort: a cache that cannot write only costs a refetch later."""
        try:
            self.store.put(digest, data)
        except StorageError as exc:
            log.warning("local cache cannot keep %s: %s", digest, exc)

    def purge(self, digests: Iterable[str]) -> None:
        for digest in digests:
            self.store.delete(digest)

    def purge_record(self, digests: list[str]) -> StorePurge:
        """The receipt entry of a forget whose ``digests`` this replica's cache purged."""
        return StorePurge("local-cache", self.kind, "purged",
                          f"{len(digests)} digest(s) purged from this replica's cache "
                          f"({self.where}); other replicas purge theirs on the forget event")

    def digests(self) -> list[str]:
        return list(self.store.digests())

    def close(self) -> None:
        self.store.close()
