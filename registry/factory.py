"""Opening a registry from settings: an index (SQLite or Redis) over a blob store.

The index is Redis when ``redis_url`` is set (shared by replicas), else SQLite in
``registry_dir`` (embedded). ``blob_url`` (``TMC_BLOB_URL``) says where component bytes live,
with any index:

    None                  today's default: files in ``registry_dir/blobs`` (embedded) or
                          the shared Redis (``P blob:<digest>``)
    file:///abs/path      content-addressed files there (durable writes; a shared volume
                          when replicas share a Redis index)
    redis                 the shared Redis (needs ``redis_url``)
    s3://bucket[/prefix]  S3-compatible object storage, configured by the ``AWS_*``
                          variables (``registry.s3_blobs``)

A replica keeps a verified local byte cache (``cache_dir``, in memory when None) whenever
its bytes are not local files it owns: with a Redis index, and with S3 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis

from registry.core import Registry
from registry.errors import RegistryError
from registry.file_blobs import SHARED_PARTIAL_GRACE_S, FileBlobStore
from registry.local_cache import LocalCache, MemoryBlobStore
from registry.ports import BlobStore, Index
from registry.redis_backend import RedisBlobStore, RedisIndex
from registry.redis_persistence import watch_persistence
from registry.redis_tx import Keys
from registry.sqlite_index import SqliteIndex
from tangent import TangentParam

DEFAULT_MAX_COMPONENT_BYTES = 512 * 1024 * 1024
BLOB_URL_FORMS = "file:///absolute/path, redis, or s3://bucket[/prefix]"


class BlobPlaceError(RegistryError, ValueError):
    """A malformed ``TMC_BLOB_URL`` or one that cannot go with the index settings (a
    ValueError; a RegistryError too, so ``tmc serve`` says the registry cannot be opened)."""


def blob_place(blob_url: str | None, registry_dir: Path | None,
               redis_url: str | None) -> tuple[str, str]:
    """Where the bytes live: ("file", "/abs/path"), ("redis", ""), or ("s3", "s3://…").

    Raises BlobPlaceError (a ValueError), saying what to set, for a malformed URL or an
    impossible combination.
    """
    if not redis_url and registry_dir is None:
        raise BlobPlaceError("open_registry needs registry_dir (embedded) or redis_url (shared)")
    if blob_url is None:
        if redis_url or registry_dir is None:
            return "redis", ""
        return "file", str(registry_dir / "blobs")
    if blob_url == "redis":
        if not redis_url:
            raise BlobPlaceError("TMC_BLOB_URL=redis keeps component bytes in the shared Redis, "
                                 "but TMC_REDIS_URL is not set: set it, or pick file:///path or "
                                 "s3://bucket/prefix for the bytes")
        return "redis", ""
    if blob_url.startswith("s3://"):
        return "s3", blob_url
    if blob_url.startswith("file:"):
        return "file", _file_path(blob_url)
    raise BlobPlaceError(f"TMC_BLOB_URL {blob_url!r} is not a blob store: use {BLOB_URL_FORMS}")


def _file_path(url: str) -> str:
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not path.startswith("/") or (
            parts.query or parts.fragment):
        raise BlobPlaceError(f"TMC_BLOB_URL {url!r}: a file URL is file:///absolute/path "
                             "(three slashes, no host, query or fragment)")
    return path


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=60.0,
                                health_check_interval=30)


def _open_blobs(kind: str, location: str, client: redis.Redis | None,
                keys: Keys) -> tuple[BlobStore, str]:
    """The blob store and how errors and receipts name it."""
    if kind == "redis":
        assert client is not None  # blob_place refused redis bytes without a Redis
        return RedisBlobStore(client, keys), f"Redis ({keys.blob_pattern()})"
    if kind == "s3":
        from registry.s3_blobs import open_s3_blobs  # boto3 is imported only when used

        try:
            store = open_s3_blobs(location)
        except ValueError as exc:  # a malformed URL or AWS_ENDPOINT_URL: say so at open
            raise BlobPlaceError(str(exc)) from exc
        return store, store.describe()
    # With a Redis index no lock spans replicas' puts (SQLite's file lock does): keep young
    # temp files, they may be another replica's put in flight
    grace = SHARED_PARTIAL_GRACE_S if client is not None else 0.0
    return (FileBlobStore(Path(location), partial_grace_s=grace),
            f"file://{Path(location).absolute()}")


def _local_cache(cache_dir: Path | None) -> LocalCache:
    if cache_dir is None:
        return LocalCache(MemoryBlobStore(), "memory", "memory")
    return LocalCache(FileBlobStore(cache_dir, durable=False), "file", str(cache_dir))


def open_registry(*, registry_dir: Path | None, redis_url: str | None, base_fingerprint: str,
                  region: Mapping[str, TangentParam],
                  max_component_bytes: int = DEFAULT_MAX_COMPONENT_BYTES,
                  cache_dir: Path | None = None, redis_prefix: str = "tmc:",
                  listen: bool = True, blob_url: str | None = None) -> Registry:
    """The Redis registry when ``redis_url`` is set, else the embedded one in ``registry_dir``;
    bytes where ``blob_url`` says (see the module docstring).

    Redis mode caches bytes by digest in ``cache_dir`` (in memory when None) and, with
    ``listen``, purges on other replicas' forgets as they happen. Raises ValueError for a bad
    ``blob_url`` or combination, StorageError when a store is unreachable, ConflictError
    when the registry belongs to another base.
    """
    kind, location = blob_place(blob_url, registry_dir, redis_url)
    keys = Keys(redis_prefix)
    client = _redis_client(redis_url) if redis_url else None
    blobs, where = _open_blobs(kind, location, client, keys)
    index: Index
    try:
        if client is not None:
            index = RedisIndex(client, keys, holds_blobs=kind == "redis")
        else:
            assert registry_dir is not None  # blob_place checked it
            index = SqliteIndex(registry_dir)
    except BaseException:
        blobs.close()
        raise
    cache = _local_cache(cache_dir) if client is not None or kind == "s3" else None
    try:
        index.ping()
        registry = Registry(index, blobs, base_fingerprint=base_fingerprint, region=region,
                            max_component_bytes=max_component_bytes, cache=cache,
                            backend="redis" if client is not None else "sqlite",
                            listen=listen, blob_kind=kind, blob_where=where)
    except BaseException:
        index.close()
        blobs.close()
        if cache is not None:
            cache.close()
        raise
    if client is not None:  # records (and maybe bytes) in Redis: a forget rewrites
        watch_persistence(registry, client)  # its AOF/RDB files too
    return registry
