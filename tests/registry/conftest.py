"""The registry contract suite runs over every index + blob store combination (``store``):
SQLite + files (the embedded default), Redis + Redis (the shared default), Redis + S3,
SQLite + S3 and Redis + files (a shared volume). S3 is a real ``weed mini``: one versioned
bucket for the session (SeaweedFS gives every bucket its own volumes, so a bucket per test
runs it out of writable volumes) and a fresh key prefix per test; Redis a real redis-server,
emptied around each test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from registry import Registry
from tests.conftest_redis import redis_server  # noqa: F401
from tests.conftest_s3 import S3Server, s3_server  # noqa: F401
from tests.registry.support import Store

COMBOS = [
    "sqlite+file",
    pytest.param("redis+redis", marks=pytest.mark.redis),
    pytest.param("redis+s3", marks=[pytest.mark.redis, pytest.mark.s3]),
    pytest.param("sqlite+s3", marks=pytest.mark.s3),
    pytest.param("redis+file", marks=pytest.mark.redis),
]
# Every combination for the contracts that depend on where the bytes are (forgetting,
# compositions, crashes and concurrency, and TMC_BLOB_URL itself); the two defaults for the
# rest (ids, validation, bounds: decided before any byte is stored), which would otherwise
# cost ~2.5x the suite's time on 2 cores for checks that cannot differ between stores.
FULL_MATRIX = {"test_forget", "test_compositions", "test_processes", "test_blob_url"}
DEFAULTS = COMBOS[:2]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" in metafunc.fixturenames:
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        combos = COMBOS if module in FULL_MATRIX else DEFAULTS
        metafunc.parametrize("store", combos, indirect=True)


@pytest.fixture
def redis_db(redis_server: str) -> Iterator[str]:  # noqa: F811
    """The session's redis-server, emptied before and after each test."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    yield redis_server
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()


@pytest.fixture(scope="session")
def versioned_bucket(s3_server: S3Server) -> str:  # noqa: F811
    return s3_server.make_bucket(versioned=True)


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A ``Store`` of ``kind`` ("<index>+<blobs>"), its servers started and emptied."""
    index, blobs = kind.split("+")
    url = request.getfixturevalue("redis_db") if "redis" in (index, blobs) else None
    if blobs == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        s3.apply_env(request.getfixturevalue("monkeypatch"))
        bucket, prefix = request.getfixturevalue("versioned_bucket"), secrets.token_hex(6)
        return Store(kind, tmp_path, url, f"s3://{bucket}/{prefix}", s3.client(), bucket,
                     prefix)
    blob_url = f"file://{tmp_path / 'shared-blobs'}" if kind == "redis+file" else None
    return Store(kind, tmp_path, url, blob_url)


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, request, tmp_path)
    yield s
    s.close_all()


@pytest.fixture
def redis_store(redis_db: str, tmp_path: Path) -> Iterator[Store]:
    s = Store("redis+redis", tmp_path, redis_db)
    yield s
    s.close_all()


@pytest.fixture
def reg(store: Store) -> Registry:
    return store.open()
