"""A real S3 server for the tests: SeaweedFS ``weed mini``, on free loopback ports.

Use it from a conftest with ``from tests.conftest_s3 import s3_server  # noqa: F401``.
A test that stops its store mid-test starts a dedicated one with ``running_weed(workdir)``
(and a replacement on the same ports, keys and data with ``running_weed(workdir, like=s)``).
One ``weed mini`` process lives for the whole test session, with its data and log
(``weed.log``, named in every failure) in a temp folder; every port it opens is a free one
bound to 127.0.0.1, so several sessions can run side by side. How it is started, secured and
stopped is loopback.weed's (shared with bench/): requests must be signed with the session's
credentials, buckets are not created on first upload.

Tests get isolation by bucket, not by server: ``S3Server.make_bucket()`` creates a fresh
bucket (optionally versioned). ``S3Server.env()`` is the ``AWS_*`` environment the code under
test reads (``monkeypatch.setenv`` each, or ``S3Server.apply_env(monkeypatch)``).

It fails (never skips) when the ``weed`` binary is missing, because ``make setup`` installs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopback.process import LoopbackError
from loopback.weed import S3Endpoint, weed_server

S3Server = S3Endpoint  # the name the tests know it by
IDENTITY = "tmc-test"  # access key tmc-test-access; fresh buckets tmc-test-<random>


@contextlib.contextmanager
def running_weed(workdir: Path, *, like: S3Server | None = None) -> Iterator[S3Server]:
    """A dedicated ``weed mini`` with its data and log in ``workdir``, stopped when the block
    ends (a test may stop it earlier by leaving the block). With ``like`` (a server that has
    stopped), the new one takes its ports and keys: started on the same ``workdir`` it serves
    the same buckets and objects at the same endpoint, so clients reconnect to it."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(weed_server(workdir, identity=IDENTITY, like=like))
        except LoopbackError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A ``weed mini`` S3 endpoint that lives for the test session."""
    with running_weed(tmp_path_factory.mktemp("weed")) as server:
        yield server
