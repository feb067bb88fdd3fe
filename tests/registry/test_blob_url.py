"""TMC_BLOB_URL: bytes outside the index. Forget receipts name every store; a blob delete that
fails after the index change fails the forget loudly and the next sweep finishes it; the
races the per-digest lease closes (a sweep or a forget on another replica against an add),
played deterministically at the core's test hooks; a dead or missing object store is a
StorageError that names it."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import redis

import registry.core as core
import registry.redis_backend as redis_backend
from registry import NotFoundError, Registry, RegistryError, StorageError, open_registry
from registry.errors import BusyError
from registry.factory import BlobPlaceError, blob_place
from tests.conftest_s3 import S3Server
from tests.registry.conftest import make_store
from tests.registry.support import FP, REGION, Store, make_component

EXTERNAL = [  # the bytes are not in the index's own store
    "sqlite+s3",
    pytest.param("redis+s3", marks=[pytest.mark.redis, pytest.mark.s3]),
    pytest.param("redis+file", marks=pytest.mark.redis),
]
LEASED = [  # a Redis index over bytes elsewhere: replicas coordinate by per-digest leases
    pytest.param("redis+file", marks=pytest.mark.redis),
    pytest.param("redis+s3", marks=[pytest.mark.redis, pytest.mark.s3]),
]


@pytest.fixture(params=[pytest.param("sqlite+file"), *EXTERNAL])
def external(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Combinations where the core deletes the bytes after the index change (SQLite +
    files included: it always did)."""
    s = make_store(request.param, request, tmp_path)
    yield s
    s.close_all()


@pytest.fixture(params=LEASED)
def leased(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, request, tmp_path)
    yield s
    s.close_all()


def at_hook(monkeypatch: pytest.MonkeyPatch, point: str, action: Callable[[], Any]) -> list[Any]:
    """Run ``action`` (once) when the core reaches test hook ``point``; returns its results."""
    results: list[Any] = []

    def hook(name: str) -> None:
        if name == point and not results:
            results.append(action())
    monkeypatch.setattr(core, "crash_point", hook)
    return results


# -- the forget receipt --------------------------------------------------------------------


def test_the_receipt_names_each_store_and_what_it_did(store: Store, reg: Registry) -> None:
    digests = [reg.add("a", make_component(i).data).digest for i in (1, 2)]
    reg.load_bytes(digests[0])
    receipt = reg.forget("a")
    stores = [(p.store, p.kind, p.state) for p in receipt.purged]
    expected = [("index", store.index, "purged"), ("blobs", store.blobs, "purged")]
    if store.cached:
        expected.append(("local-cache", "file", "purged"))
    assert stores[:len(expected)] == expected, receipt.purged
    blobs = receipt.purged[1].detail
    if store.blobs == "s3":  # a versioned bucket: one version per digest
        assert blobs == (f"2 object version(s) deleted from "
                         f"s3://{store.bucket}/{store.prefix}")
    elif store.blobs == "file":
        assert blobs == f"2 blob(s) deleted from file://{store.blob_dir}"
    else:
        assert blobs.startswith("2 blob(s) deleted from Redis (tmc:blob:*)")
    if store.cached:
        assert str(store.root / "cache") in receipt.purged[2].detail
    assert store.blob_digests() == []


# -- a blob delete that fails after the index change ------------------------------------------


def test_a_failed_blob_delete_fails_the_forget_loudly_and_the_sweep_finishes_it(
        external: Store) -> None:
    store = external
    reg = store.open()
    made = make_component(5)
    digest = reg.add("secret", made.data).digest

    def refuse(*args: object) -> None:
        raise StorageError("injected: the store refused the delete")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(StorageError) as failed:
        for name in ("delete", "purge"):
            patch.setattr(reg._blobs, name, refuse, raising=False)
        reg.forget("secret")
    message = str(failed.value)
    assert "'secret' is forgotten from the index" in message and digest in message
    assert reg.blob_where in message and "next sweep" in message and "injected" in message
    with pytest.raises(NotFoundError):
        reg.get("secret")
    with pytest.raises(NotFoundError):
        reg.load_bytes(digest)
    assert store.blob_digests() == [digest]  # the bytes did stay behind
    store.open(cache="cache-sweeper")  # every open sweeps
    assert store.blob_digests() == []
    assert store.find(made.tensor_pattern) == [] and store.find(made.provenance_pattern) == []


# -- races between replicas, played at the core's hooks ------------------------------------------


def test_a_sweep_elsewhere_never_deletes_bytes_an_add_is_about_to_index(
        leased: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica B opens (and sweeps) after A wrote the bytes and before A's index change."""
    store = leased
    a = store.open()
    made = make_component(3)
    opened: list[Registry] = []
    at_hook(monkeypatch, "after_blob",
            lambda: opened.append(store.open(cache="cache-b", listen=False)))
    digest = a.add("x", made.data).digest
    assert opened, "the hook ran B's open (and its sweep) between A's blob and index"
    assert store.blob_digests() == [digest]
    assert opened[0].load_bytes(digest) == made.data


def test_without_the_lease_that_sweep_would_lose_the_bytes(
        leased: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same schedule with the lease taken away leaves an index entry whose
    bytes are gone, which is what the lease prevents."""
    store = leased
    a = store.open()
    monkeypatch.setattr(redis_backend.RedisIndex, "mutation_lock",
                        lambda self, digests=(), wait=True: nullcontext())
    at_hook(monkeypatch, "after_blob", lambda: store.open(cache="cache-b", listen=False))
    digest = a.add("x", make_component(3).data).digest
    assert store.blob_digests() == []
    fresh = store.open(cache="cache-c", listen=False)
    with pytest.raises(StorageError, match="missing"):
        fresh.load_bytes(digest)


def test_a_re_add_elsewhere_waits_for_a_forget_to_delete_the_bytes(
        leased: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """B re-adds the same bytes between A's forget index change and A's blob delete: the
    lease makes B wait (here: refuse at once), so A's delete cannot orphan B's entry."""
    store = leased
    a, b = store.open(), store.open(cache="cache-b", listen=False)
    made = make_component(4)
    digest = a.add("x", made.data).digest
    monkeypatch.setattr(redis_backend, "LEASE_WAIT_S", 0.0)

    def re_add() -> str:
        with pytest.raises(BusyError, match=digest):
            b.add("x", made.data)
        return "refused"
    results = at_hook(monkeypatch, "after_forget_index", re_add)
    a.forget("x")
    assert results == ["refused"]
    assert store.blob_digests() == []
    assert b.add("x", made.data).created_version  # after the forget: a new registration
    assert store.blob_digests() == [digest] and b.load_bytes(digest) == made.data


def test_a_lease_lost_before_the_index_change_changes_nothing(
        leased: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fencing: an add whose lease expired (a stalled holder) cannot write its entry."""
    store = leased
    reg = store.open()
    assert store.url is not None
    with redis.Redis.from_url(store.url) as client:
        at_hook(monkeypatch, "after_blob",
                lambda: client.delete(*client.keys("tmc:lease:*")))
        with pytest.raises(StorageError, match="lost the lease"):
            reg.add("x", make_component(6).data)
    assert reg.list() == [] and reg.generation() == 0


# -- an object store that is gone ------------------------------------------------------------


@pytest.mark.s3
def test_a_missing_bucket_fails_ping_and_cold_loads_naming_the_store(
        s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s3_server.apply_env(monkeypatch)
    bucket = s3_server.make_bucket()
    kw: dict[str, Any] = dict(registry_dir=tmp_path / "reg", redis_url=None,
                              base_fingerprint=FP, region=REGION, max_component_bytes=1 << 16,
                              blob_url=f"s3://{bucket}/tmc")
    with open_registry(**kw, cache_dir=tmp_path / "c1") as reg, \
            open_registry(**kw, cache_dir=tmp_path / "c2") as cold:
        digest = reg.add("x", make_component(1).data).digest
        reg.ping()
        raw = s3_server.client()
        for obj in raw.list_objects_v2(Bucket=bucket).get("Contents", []):
            raw.delete_object(Bucket=bucket, Key=obj["Key"])
        raw.delete_bucket(Bucket=bucket)
        raw.close()
        with pytest.raises(StorageError, match=f"bucket {bucket} does not exist"):
            reg.ping()
        with pytest.raises(StorageError, match=f"cannot fetch version {digest} from "
                                               f"s3://{bucket}/tmc"):
            cold.load_bytes(digest)


def test_an_unreachable_object_store_is_a_storage_error_at_open(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(StorageError, match="unreachable"):
            open_registry(registry_dir=tmp_path / "reg", redis_url=None, base_fingerprint=FP,
                          region=REGION, blob_url="s3://tmc-nowhere/p")


# -- TMC_BLOB_URL forms and combinations -------------------------------------------------------


def test_blob_places() -> None:
    reg_dir = Path("/r")
    assert blob_place(None, reg_dir, None) == ("file", "/r/blobs")
    assert blob_place(None, None, "redis://x") == ("redis", "")
    assert blob_place("redis", None, "redis://x") == ("redis", "")
    assert blob_place("file:///srv/blobs", reg_dir, "redis://x") == ("file", "/srv/blobs")
    assert blob_place("file://localhost/srv/b%20c", reg_dir, None) == ("file", "/srv/b c")
    assert blob_place("s3://b/p", reg_dir, None) == ("s3", "s3://b/p")


@pytest.mark.parametrize(("url", "registry_dir", "redis_url", "message"), [
    ("redis", Path("/r"), None, "TMC_REDIS_URL is not set"),
    ("file://host/srv", Path("/r"), None, "file:///absolute/path"),
    ("file:relative", Path("/r"), None, "file:///absolute/path"),
    ("gs://bucket", Path("/r"), None, "not a blob store"),
    ("s3://b", None, None, "registry_dir"),
])
def test_impossible_blob_places_are_refused(url: str, registry_dir: Path | None,
                                            redis_url: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        blob_place(url, registry_dir, redis_url)
    assert isinstance(refused.value, RegistryError)  # tmc serve: "cannot open the registry"


def test_a_bad_s3_url_is_refused_before_anything_is_opened(tmp_path: Path) -> None:
    with pytest.raises(BlobPlaceError, match="bucket"):  # a ValueError and a RegistryError
        open_registry(registry_dir=tmp_path / "reg", redis_url=None, base_fingerprint=FP,
                      region=REGION, blob_url="s3://UPPER/p")
    assert not (tmp_path / "reg").exists()
