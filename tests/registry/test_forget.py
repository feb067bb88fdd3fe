"""Contract: exact forgetting — on every index + blob store combination."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from registry import InvalidIdError, NotFoundError, Registry
from tests.registry.support import Store, make_component


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_forget_returns_a_receipt_and_the_id_is_gone(reg: Registry) -> None:
    d1 = reg.add("a", make_component(1).data).digest
    d2 = reg.add("a", make_component(2).data).digest
    reg.add("b", make_component(3).data)
    reg.put_composition("canary", {"a": 0.1, "b": 0.9})
    reg.put_composition("solo-b", {"b": 1.0})
    g = reg.generation()
    receipt = reg.forget("a")
    assert (receipt.id, receipt.digests_removed, receipt.generation) == ("a", [d1, d2], g + 1)
    assert receipt.compositions_changed == ["canary"] and reg.generation() == g + 1
    with pytest.raises(NotFoundError, match="no component 'a'"):
        reg.get("a")
    with pytest.raises(NotFoundError, match=r"\['a'\]"):
        reg.resolve_explicit({"a": 1.0, "b": 1.0})
    for digest in (d1, d2):
        with pytest.raises(NotFoundError):
            reg.load_tensors(digest)
    assert [c.id for c in reg.list()] == ["b"]
    assert [i.id for i in reg.resolve_all_active().items] == ["b"]
    canary = reg.get_composition("canary")
    assert (canary.weights, canary.generation) == ({"b": 0.9}, g + 1)
    assert [i.id for i in reg.resolve_named("canary").items] == ["b"]
    assert reg.get_composition("solo-b").generation < g + 1


def test_forget_refuses_bad_and_unknown_ids(reg: Registry) -> None:
    with pytest.raises(InvalidIdError):
        reg.forget("../etc")
    with pytest.raises(NotFoundError):
        reg.forget("ghost")


def test_the_bytes_are_unrecoverable_from_storage(store: Store, reg: Registry) -> None:
    made, other = make_component(7), make_component(8)
    digest = reg.add("secret", made.data).digest
    reg.add("other", other.data)
    reg.load_tensors(digest)  # Redis mode: now also in the local cache
    assert store.find(made.tensor_pattern) and store.find(made.provenance_pattern)
    reg.forget("secret")
    assert store.find(made.tensor_pattern) == []
    assert store.find(made.provenance_pattern) == []
    assert store.find(digest.encode()) == [] and digest not in store.blob_digests()
    assert store.find(other.tensor_pattern)  # the scan does see what is still registered


def test_re_adding_after_forget_is_a_new_registration(reg: Registry) -> None:
    data = make_component(1).data
    first = reg.add("a", data, 0.3, ["old"], False)
    reg.add("a", make_component(2).data)
    created = reg.get("a").created
    receipt = reg.forget("a")
    again = reg.add("a", data)
    assert again.created_version and again.digest == first.digest
    assert again.generation == receipt.generation + 1
    info = reg.get("a")
    assert info.versions == [first.digest] and info.created >= created
    assert (info.weight, info.tags, info.active) == (1.0, [], True)
    assert reg.load_bytes(first.digest) == data


def test_purge_hook_hears_this_process_forget(reg: Registry) -> None:
    heard: list[list[str]] = []
    reg.on_forget(heard.append)
    receipt = reg.forget(reg.add("a", make_component(1).data).id)
    assert heard[0] == receipt.digests_removed


def test_another_instance_never_serves_a_forgotten_component(store: Store) -> None:
    """B has no pub/sub: its next resolve or load still refuses the component and purges."""
    a, b = store.open(), store.open(cache="cache-b", listen=False)
    heard: list[list[str]] = []
    b.on_forget(heard.append)
    made = make_component(1)
    digest = a.add("x", made.data).digest
    b.resolve_explicit({"x": 1.0})
    b.load_tensors(digest)
    cached = store.root / "cache-b" / digest[:2] / digest
    assert cached.exists() == store.cached
    a.forget("x")
    with pytest.raises(NotFoundError):
        b.resolve_explicit({"x": 1.0})
    assert heard == [[digest]] and not cached.exists()
    if store.cached:  # even a stale copy left in B's cache is never served
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(made.data)
    with pytest.raises(NotFoundError):
        b.load_tensors(digest)
    assert not cached.exists()


@pytest.mark.redis
def test_another_instance_hears_the_forget_at_once(redis_store: Store) -> None:
    """Redis mode pushes forgets (pub/sub); the embedded mode checks on each resolve."""
    store = redis_store
    a, b = store.open(), store.open(cache="cache-b")
    heard: list[list[str]] = []
    b.on_forget(heard.append)
    digest = a.add("x", make_component(1).data).digest
    b.load_tensors(digest)
    cached = store.root / "cache-b" / digest[:2] / digest
    assert cached.exists()
    a.forget("x")
    assert _wait_for(lambda: heard == [[digest]] and not cached.exists())


@pytest.mark.redis
def test_a_corrupt_cache_entry_is_refetched(redis_store: Store) -> None:
    store = redis_store
    reg = store.open()
    made = make_component(1)
    digest = reg.add("x", made.data).digest
    reg.load_bytes(digest)
    cached = store.root / "cache" / digest[:2] / digest
    cached.write_bytes(b"tampered")
    assert reg.load_bytes(digest) == made.data and cached.read_bytes() == made.data


def test_partial_writes_left_by_a_crash_are_swept_on_open(store: Store) -> None:
    """A temp file from a killed writer (blob store or local cache) holds component bytes."""
    store.open()
    made = make_component(1)
    folder = store.root / "cache" if store.cached else store.registry_dir / "blobs"
    (folder / "ab").mkdir(parents=True, exist_ok=True)
    (folder / "ab" / f".{'ab' * 32}.0123456789abcdef.tmp").write_bytes(made.data)
    assert store.find(made.tensor_pattern)
    store.open()
    assert store.find(made.tensor_pattern) == []
