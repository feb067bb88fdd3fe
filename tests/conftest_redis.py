"""A real redis-server for the tests, started on a free loopback port and stopped afterwards.

Use it from a conftest with ``from tests.conftest_redis import redis_server  # noqa: F401``.
The launcher is loopback.redis_server (shared with bench/ and scripts/): it never touches a
Redis it did not start; this session's persists nothing. It fails (does not skip) when the
binary is missing, because ``make setup`` installs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from loopback import redis_server as loopback_redis
from loopback.process import LoopbackError


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a fresh redis-server (no AOF, no RDB) that lives for the test session."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(loopback_redis.redis_server(
                tmp_path_factory.mktemp("redis"), appendonly=False))
        except LoopbackError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url
