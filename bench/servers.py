"""Storage servers the registry benchmarks start on loopback: redis-server and ``weed mini``.

The launchers are loopback's (shared with the tests and scripts/soak.py; its docstrings say
the policy: 127.0.0.1, free ports, files in the caller's folder, stopped on exit, a missing
binary raises an error that names the command installing it). Bench's side of them:

- ``redis_server(workdir, appendonly=True)``: persistence as the Helm chart runs it
  (``appendonly yes``, ``appendfsync everysec``, no RDB save rules, ``noeviction``), so a
  forget pays the AOF rewrite the registry asks for; ``appendonly=False`` persists nothing.
- ``weed_server(workdir)``: a ``weed mini`` S3 endpoint whose one identity is ``tmc-bench``
  with a fresh secret key; ``S3Endpoint.env()`` is the ``AWS_*`` environment boto3 reads,
  ``make_bucket(name, versioned=...)`` makes a bucket.
- ``binary_version``: what the results record of the binaries that ran.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from loopback import weed
from loopback.redis_server import redis_binary, redis_server
from loopback.weed import S3Endpoint, weed_binary

__all__ = ["S3Endpoint", "binary_version", "redis_binary", "redis_server", "weed_binary",
           "weed_server"]


def weed_server(workdir: Path) -> contextlib.AbstractContextManager[S3Endpoint]:
    """A ``weed mini`` S3 endpoint with its data in ``workdir``, stopped on exit."""
    return weed.weed_server(workdir, identity="tmc-bench")


def binary_version(args: list[str]) -> str:
    """The first line a ``--version``-style command prints ('' if it cannot run)."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else ""
