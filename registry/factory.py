"""Opening a registry from settings: embedded (SQLite + files) or shared (Redis)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import redis

from registry.core import Registry
from registry.file_blobs import FileBlobStore
from registry.local_cache import LocalCache, MemoryBlobStore
from registry.ports import BlobStore, Index
from registry.redis_backend import Keys, RedisBlobStore, RedisIndex
from registry.sqlite_index import SqliteIndex
from tangent import TangentParam

DEFAULT_MAX_COMPONENT_BYTES = 512 * 1024 * 1024


def open_registry(*, registry_dir: Path | None, redis_url: str | None, base_fingerprint: str,
                  region: Mapping[str, TangentParam],
                  max_component_bytes: int = DEFAULT_MAX_COMPONENT_BYTES,
                  cache_dir: Path | None = None, redis_prefix: str = "tmc:",
                  listen: bool = True) -> Registry:
    """The Redis registry when ``redis_url`` is set, else the embedded one in ``registry_dir``.

    Redis mode caches bytes by digest in ``cache_dir`` (in memory when None) and, with
    ``listen``, purges on other replicas' forgets as they happen. Raises StorageError when
    the backend is unreachable, ConflictError when it belongs to another base.
    """
    index: Index
    blobs: BlobStore
    cache: LocalCache | None = None
    if redis_url:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=5.0,
                                      socket_timeout=60.0, health_check_interval=30)
        keys = Keys(redis_prefix)
        index, blobs = RedisIndex(client, keys), RedisBlobStore(client, keys)
        store = (FileBlobStore(cache_dir, durable=False) if cache_dir is not None
                 else MemoryBlobStore())
        cache = LocalCache(store)
    elif registry_dir is not None:
        blobs = FileBlobStore(registry_dir / "blobs")
        index = SqliteIndex(registry_dir, blobs)
    else:
        raise ValueError("open_registry needs registry_dir (embedded) or redis_url (shared)")
    try:
        index.ping()
        return Registry(index, blobs, base_fingerprint=base_fingerprint, region=region,
                        max_component_bytes=max_component_bytes, cache=cache,
                        backend="redis" if redis_url else "sqlite", listen=listen)
    except BaseException:
        index.close()
        raise
