"""Content-addressed files on local disk: ``<root>/<aa>/<digest>``.

Writes go to a temp file in the same folder, are fsynced, then ``os.replace``d into place
(and the folder fsynced), so a reader sees either no file or the whole file. Paths are built
from validated hex digests only, never from ids.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from registry.errors import StorageError
from registry.validate import DIGEST_PATTERN

TEMP_SUFFIX = ".tmp"
# On a volume shared by replicas (TMC_BLOB_URL=file://…) a temp file younger than this may be
# another replica's put in flight (no lock spans replicas' puts): the sweep leaves it; the first
# open after it has aged removes it.
SHARED_PARTIAL_GRACE_S = 300.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobStore:
    """A ``BlobStore`` over a local folder."""

    def __init__(self, root: Path, *, durable: bool = True, partial_grace_s: float = 0.0
                 ) -> None:
        self.root = root
        self.durable = durable  # fsync; a cache verified on every load can skip it
        # discard_partial keeps temp files younger than this: 0 where one lock (the embedded
        # registry's) spans every put and the sweep; SHARED_PARTIAL_GRACE_S on a shared volume
        self.partial_grace_s = partial_grace_s
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create blob folder {root}: {exc}") from exc

    def path(self, digest: str) -> Path:
        if not DIGEST_PATTERN.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest

    def put(self, digest: str, data: bytes) -> None:
        final = self.path(digest)
        temp = final.with_name(f".{digest}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
        try:
            final.parent.mkdir(exist_ok=True)
            with open(temp, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            os.replace(temp, final)
            if self.durable:
                _fsync_dir(final.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StorageError(f"cannot write blob {digest}: {exc}") from exc

    def get(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read blob {digest}: {exc}") from exc

    def delete(self, digest: str) -> None:
        path = self.path(digest)
        try:
            path.unlink(missing_ok=True)
            if path.parent.exists():
                _fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot delete blob {digest}: {exc}") from exc

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def digests(self) -> Iterator[str]:
        for shard in sorted(self.root.iterdir()):
            if shard.is_dir() and len(shard.name) == 2:
                for f in sorted(shard.iterdir()):
                    if DIGEST_PATTERN.fullmatch(f.name) and f.name.startswith(shard.name):
                        yield f.name

    def discard_partial(self) -> None:
        """Delete temp files of interrupted puts older than ``partial_grace_s`` (see
        ``__init__``)."""
        cutoff = time.time() - self.partial_grace_s
        for temp in self.root.glob(f"*/.*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if temp.stat().st_mtime < cutoff:
                    temp.unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to release."""
