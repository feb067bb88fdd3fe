"""How a version's bytes leave the blob store once the index no longer references them.

Policy: when the index holds the bytes too (Redis with bytes in Redis), the index change
itself deleted them, in the same transaction, and nothing is left to do. Otherwise the bytes
are deleted right after the index change commits: every copy of them (an S3 bucket with
versioning keeps old object versions: each one is deleted, and counted). A delete that fails
after a forget's index change fails the forget loudly, naming the bytes that remain and
where: the id is already gone from the index (nothing serves the bytes), and the next sweep
(every open runs one) deletes them.
"""

from __future__ import annotations

from collections.abc import Callable

from registry.errors import StorageError
from registry.ports import BlobStore
from registry.types import StorePurge


class BlobEraser:
    """Deletes unreferenced versions' bytes from one blob store, after the index change."""

    def __init__(self, blobs: BlobStore, *, index_holds_blobs: bool, kind: str,
                 where: str) -> None:
        self._blobs, self._in_index = blobs, index_holds_blobs
        self.kind, self.where = kind, where  # "s3", "s3://bucket/prefix"

    def after_commit(self, digests: list[str]) -> None:
        """Delete the bytes of versions an index change (a sweep's) just dropped."""
        if not self._in_index:  # else the index change deleted them
            for digest in digests:
                self._blobs.delete(digest)

    def after_forget(self, cid: str, digests: list[str]) -> StorePurge:
        """After a forget's index change: delete the bytes (unless the change did) or fail
        loudly; what was deleted where, for the receipt."""
        if self._in_index:
            return StorePurge("blobs", self.kind, "purged",
                              f"{len(digests)} blob(s) deleted from {self.where} together "
                              "with the index entries")
        removed = 0
        for digest in digests:
            try:
                removed += self.erase(digest)
            except StorageError as exc:
                raise StorageError(
                    f"{cid!r} is forgotten from the index, but the bytes of version {digest} "
                    f"remain in {self.where} ({exc}); they are deleted by the next sweep "
                    "(every replica runs one when it opens: restart one) — nothing serves "
                    "them meanwhile, since the index no longer references them") from exc
        unit = "object version(s)" if self.kind == "s3" else "blob(s)"
        return StorePurge("blobs", self.kind, "purged",
                          f"{removed} {unit} deleted from {self.where}")

    def erase(self, digest: str) -> int:
        """Delete every copy of ``digest``; how many there were (S3: object versions)."""
        purge: Callable[[str], int] | None = getattr(self._blobs, "purge", None)
        if purge is not None:
            return purge(digest)
        self._blobs.delete(digest)
        return 1
