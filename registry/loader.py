"""Serving version bytes safely: only digests the index still references, verified by sha256,
through the local cache (Redis mode), purging whatever another process forgot.

Correctness never rests on pub/sub: every load first checks the index, so a forgotten digest
is never served from a stale local cache; pub/sub and the per-resolve generation check only
make purges prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import partial

from registry import ops
from registry.errors import NotFoundError, StorageError
from registry.local_cache import LocalCache, sha256_hex
from registry.ports import BlobStore, Index
from registry.validate import DIGEST_PATTERN, check_digest
from registry.watch import Watch


class Loader:
    def __init__(self, index: Index, blobs: BlobStore, cache: LocalCache | None,
                 watch: Watch, blob_where: str = "the blob store") -> None:
        self._index, self._blobs, self._cache, self._watch = index, blobs, cache, watch
        self._where = blob_where  # named in errors: "s3://bucket/prefix", "file:///path", …

    def load(self, digest: str) -> bytes:
        d = check_digest(digest)
        self._watch.loaded(d)  # before the check, so a concurrent forget purges it
        self.require_referenced(d)
        data = self._cache.get(d) if self._cache is not None else None
        if data is None:
            data = self._fetch(d)
            if self._cache is not None:
                self._cache.put(d, data)
                self.require_referenced(d)  # a forget may have landed while we fetched
        return data

    def _fetch(self, digest: str) -> bytes:
        try:
            data = self._blobs.get(digest)
        except StorageError as exc:
            raise StorageError(f"cannot fetch version {digest} from {self._where}: {exc}"
                               ) from exc
        if data is None:
            self.require_referenced(digest)
            raise StorageError(f"the bytes of version {digest} are missing from {self._where}")
        if sha256_hex(data) != digest:
            raise StorageError(f"the bytes of version {digest} in {self._where} are corrupt")
        return data

    def require_referenced(self, digest: str) -> None:
        if self.unreferenced([digest]):
            raise NotFoundError(f"no component version {digest}")

    def unreferenced(self, digests: Iterable[str]) -> list[str]:
        """Those of ``digests`` no id owns any more, purged from this process."""
        wanted = list(digests)
        if not wanted:
            return []
        gone = self._index.read(partial(ops.unreferenced, digests=wanted))
        if gone:
            self.purge(gone)
        return gone

    def purge(self, digests: list[str], *, own: bool = False) -> None:
        if self._cache is not None:
            self._cache.purge(digests)
        self._watch.forgotten(digests, own=own)

    def sweep_cache(self) -> None:
        """On open: drop partial writes and entries whose digest the index no longer has."""
        if self._cache is not None:
            self._cache.store.discard_partial()
            self.unreferenced(self._cache.digests())

    def reconcile(self, generation: int) -> None:
        """After another process changed the registry: purge what it forgot."""
        if self._watch.is_stale(generation):
            self.unreferenced(self._watch.loaded_digests())
            self._watch.changed(generation)

    def on_event(self, text: str) -> None:
        """A change announced by another process (Redis pub/sub)."""
        doc = json.loads(text)
        gone = [str(d) for d in doc.get("forgotten", []) if DIGEST_PATTERN.fullmatch(str(d))]
        if gone:
            self.purge(gone)
        self._watch.changed(int(doc["generation"]))
