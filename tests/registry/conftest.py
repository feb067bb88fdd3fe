from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from registry import Registry
from tests.conftest_redis import redis_server  # noqa: F401
from tests.registry.support import Store


@pytest.fixture
def redis_db(redis_server: str) -> Iterator[str]:  # noqa: F811
    """The session's redis-server, emptied before and after each test."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    yield redis_server
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = request.getfixturevalue("redis_db") if request.param == "redis" else None
    s = Store(request.param, tmp_path, url)
    yield s
    s.close_all()


@pytest.fixture
def redis_store(redis_db: str, tmp_path: Path) -> Iterator[Store]:
    s = Store("redis", tmp_path, redis_db)
    yield s
    s.close_all()


@pytest.fixture
def reg(store: Store) -> Registry:
    return store.open()
