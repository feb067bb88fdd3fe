"""Contract across processes: a crash mid-add changes nothing; concurrent adders are safe."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from registry import NotFoundError, Registry
from registry.redis_backend import LEASE_TTL_S
from tests.registry.support import Store, make_component

ROOT = Path(__file__).resolve().parents[2]


def _proc(store: Store, *items: str, crash: str | None = None) -> subprocess.Popen[bytes]:
    """A process that opens the store, says "ready", and adds ``items`` when told to go."""
    env = {k: v for k, v in os.environ.items() if k != "TMC_TEST_CRASH_POINT"}
    if crash:
        env["TMC_TEST_CRASH_POINT"] = crash
    args = [sys.executable, "-m", "tests.registry.proc", store.kind, str(store.root),
            store.url or "-", store.blob_url or "-", *items]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = proc.communicate(b"go\n", timeout=120)
    return proc.returncode, err.decode(errors="replace")


def test_a_crash_between_blob_and_index_leaves_the_registry_as_it_was(
        store: Store, reg: Registry) -> None:
    reg.add("kept", make_component(1).data)
    before, generation, listed = store.state(), reg.generation(), reg.list()
    rc, err = _finish(_proc(store, "crashed:2", crash="after_blob"))
    assert rc == -signal.SIGKILL, err
    blobs, keys = store.state()  # the blob was written, and nothing else (but a lease)
    leases = {k for k in keys - before[1] if k.startswith(b"tmc:lease:")}
    grown = (len(blobs) - len(before[0]), len(keys - before[1] - leases),
             len(before[1] - keys))
    assert grown == (1, 0, 0)
    assert reg.list() == listed and reg.generation() == generation
    if store.index == "redis" and store.blobs != "redis":
        _lease_expires(store, leases, blobs)
    else:
        assert leases == set()
    reopened = store.open(cache="cache-after-crash")
    assert store.state() == before  # the orphan blob was swept on open
    assert reopened.list() == listed and reopened.generation() == generation
    assert reopened.add("crashed", make_component(2).data).created_version


def _lease_expires(store: Store, leases: set[bytes], blobs: list[str]) -> None:
    """The dead adder's lease keeps sweeps off its digest until it expires; then it goes."""
    assert len(leases) == 1 and store.url is not None
    with redis.Redis.from_url(store.url) as client:
        (lease,) = leases
        assert 0 < client.pttl(lease) <= LEASE_TTL_S * 1000
        store.open(cache="cache-while-leased")  # sweeps, and must skip the leased digest
        assert store.state()[0] == blobs
        client.delete(lease)  # what its expiry does


def test_a_crash_between_forget_index_and_blob_delete_is_finished_by_the_sweep(
        store: Store, reg: Registry) -> None:
    """Killed after the index change of a forget, before the bytes went: the id is gone for
    everyone, and the next sweep deletes the bytes (once a dead holder's lease expired)."""
    made = make_component(9)
    digest = reg.add("doomed", made.data).digest
    rc, err = _finish(_proc(store, "forget:doomed", crash="after_forget_index"))
    assert rc == -signal.SIGKILL, err
    with pytest.raises(NotFoundError):
        reg.get("doomed")
    with pytest.raises(NotFoundError):
        reg.load_bytes(digest)
    if store.blobs == "redis":  # the bytes went in the index change itself
        assert store.blob_digests() == []
    else:
        assert store.blob_digests() == [digest]
        leases = {k for k in store.redis_keys() if k.startswith(b"tmc:lease:")}
        if store.index == "redis":
            _lease_expires(store, leases, [digest])
        store.open(cache="cache-sweeper")
    assert store.blob_digests() == [] and store.find(made.tensor_pattern) == []


def test_two_processes_adding_at_once(store: Store, reg: Registry) -> None:
    """This process and another add at the same moment, one id in common."""
    other = _proc(store, *[f"p2-{i}:{i + 50}" for i in range(12)], "both:200")
    mine = [(f"p1-{i}", make_component(i).data) for i in range(12)]
    mine.append(("both", make_component(100).data))
    assert other.stdin is not None
    other.stdin.write(b"go\n")
    other.stdin.flush()
    for cid, data in mine:
        reg.add(cid, data)
    rc, err = _finish(other)
    assert rc == 0, err
    infos = {c.id: c for c in reg.list()}
    assert len(infos) == 25 and len(infos["both"].versions) == 2
    assert reg.generation() == 26
    digests = {d for c in infos.values() for d in c.versions}
    assert set(store.blob_digests()) == digests
    for digest in digests:
        assert hashlib.sha256(reg.load_bytes(digest)).hexdigest() == digest


def test_threads_share_one_registry(reg: Registry) -> None:
    """The service calls one Registry from a thread pool."""
    def work(i: int) -> None:
        digest = reg.add(f"t{i}", make_component(i).data).digest
        assert reg.resolve_explicit({f"t{i}": 1.0}).items[0].digest == digest
        assert hashlib.sha256(reg.load_bytes(digest)).hexdigest() == digest
        if i % 2:
            reg.forget(f"t{i}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(16)))
    assert [c.id for c in reg.list()] == sorted(f"t{i}" for i in range(0, 16, 2))
    assert reg.generation() == 16 + 8
