"""Contract: named compositions (compare-and-set) and resolution — on both backends."""

from __future__ import annotations

import threading

import pytest

from registry import (
    ConflictError,
    InvalidIdError,
    InvalidRequestError,
    NotFoundError,
    Registry,
    ResolvedItem,
)
from tests.registry.support import Store, make_component


@pytest.fixture
def abc(reg: Registry) -> dict[str, str]:
    """Three components a, b (inactive), c; returns id -> digest."""
    return {cid: reg.add(cid, make_component(seed).data, weight, active=cid != "b").digest
            for seed, (cid, weight) in enumerate([("a", 1.0), ("b", 2.0), ("c", 0.5)])}


def test_put_get_list_delete(reg: Registry, abc: dict[str, str]) -> None:
    g = reg.generation()
    comp = reg.put_composition("canary", {"a": 0.9, "c": 0.1}, "sum")
    assert (comp.name, comp.weights, comp.normalize, comp.generation) == (
        "canary", {"a": 0.9, "c": 0.1}, "sum", g + 1)
    assert reg.get_composition("canary") == comp
    reg.put_composition("stable", {"a": 1})
    assert [c.name for c in reg.list_compositions()] == ["canary", "stable"]
    assert reg.delete_composition("canary") == g + 3
    with pytest.raises(NotFoundError, match="no composition 'canary'"):
        reg.get_composition("canary")
    with pytest.raises(NotFoundError):
        reg.delete_composition("canary")


def test_replacing_with_identical_content_changes_nothing(reg: Registry,
                                                           abc: dict[str, str]) -> None:
    first = reg.put_composition("stable", {"a": 1.0})
    assert reg.put_composition("stable", {"a": 1.0}) == first
    assert reg.generation() == first.generation


def test_compare_and_set(reg: Registry, abc: dict[str, str]) -> None:
    created = reg.put_composition("ramp", {"a": 1.0}, expected_generation=0)
    with pytest.raises(ConflictError, match="is at generation"):
        reg.put_composition("ramp", {"a": 0.5, "c": 0.5}, expected_generation=0)
    reg.reweight("a", 3.0)  # unrelated changes do not break the compare-and-set
    moved = reg.put_composition("ramp", {"a": 0.5, "c": 0.5},
                                expected_generation=created.generation)
    with pytest.raises(ConflictError, match=f"is at generation {moved.generation}"):
        reg.put_composition("ramp", {"c": 1.0}, expected_generation=created.generation)
    assert reg.get_composition("ramp").weights == {"a": 0.5, "c": 0.5}


def test_a_composition_must_name_existing_components(reg: Registry,
                                                     abc: dict[str, str]) -> None:
    g = reg.generation()
    with pytest.raises(ConflictError, match=r"unknown component\(s\) \['x', 'y'\]"):
        reg.put_composition("bad", {"a": 1.0, "y": 1.0, "x": 1.0})
    assert reg.generation() == g and reg.list_compositions() == []


@pytest.mark.parametrize(("weights", "normalize", "error"), [
    ({"a": float("nan")}, "none", InvalidRequestError),
    ({"a": None}, "none", InvalidRequestError),
    ({"a": 1.0, "c": -1.0}, "sum", InvalidRequestError),
    ({"a": 1.0}, "median", InvalidRequestError),
    ({"Bad Id": 1.0}, "none", InvalidIdError),
])
def test_bad_compositions_are_refused(reg: Registry, abc: dict[str, str], weights: dict,
                                      normalize: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        reg.put_composition("c1", weights, normalize)  # type: ignore[arg-type]
    with pytest.raises(error):
        reg.resolve_explicit(weights, normalize)  # type: ignore[arg-type]
    assert reg.list_compositions() == []


@pytest.mark.parametrize("name", ["", "UPPER", "a/b", "x" * 65])
def test_bad_composition_names(reg: Registry, name: str) -> None:
    with pytest.raises(InvalidIdError, match="composition name"):
        reg.put_composition(name, {})


def test_resolve_explicit(reg: Registry, abc: dict[str, str]) -> None:
    resolved = reg.resolve_explicit({"c": 0.25, "b": 2})
    assert resolved.generation == reg.generation() and resolved.normalize == "none"
    assert resolved.items == [ResolvedItem("b", abc["b"], 2.0), ResolvedItem("c", abc["c"], 0.25)]


def test_resolve_explicit_names_every_unknown_id(reg: Registry, abc: dict[str, str]) -> None:
    with pytest.raises(NotFoundError, match=r"\['ghost', 'zzz'\]"):
        reg.resolve_explicit({"zzz": 1.0, "a": 1.0, "ghost": 1.0})


def test_resolve_all_active_uses_registry_weights(reg: Registry, abc: dict[str, str]) -> None:
    resolved = reg.resolve_all_active("mean")
    assert resolved.items == [ResolvedItem("a", abc["a"], 1.0), ResolvedItem("c", abc["c"], 0.5)]
    assert resolved.normalize == "mean"


def test_resolve_all_active_of_an_empty_registry(reg: Registry) -> None:
    resolved = reg.resolve_all_active()
    assert (resolved.generation, resolved.items) == (0, [])


def test_resolve_named(reg: Registry, abc: dict[str, str]) -> None:
    reg.put_composition("stable", {"a": 0.75, "b": 0.25}, "sum")
    resolved = reg.resolve_named("stable")
    assert resolved.normalize == "sum" and resolved.generation == reg.generation()
    assert resolved.items == [ResolvedItem("a", abc["a"], 0.75),
                              ResolvedItem("b", abc["b"], 0.25)]
    with pytest.raises(NotFoundError, match="no composition 'nope'"):
        reg.resolve_named("nope")


def test_resolve_follows_the_current_version(reg: Registry, abc: dict[str, str]) -> None:
    v2 = reg.add("a", make_component(42).data).digest
    assert reg.resolve_explicit({"a": 1.0}).items[0].digest == v2


def test_every_resolve_is_one_generation(store: Store) -> None:
    """A writer keeps a and b equal at even generations and a = b + 1 at odd ones; every
    resolve, from another Registry on the same store, must see a matching pair."""
    writer, reader = store.open(), store.open(cache="cache-reader")
    writer.add("a", make_component(1).data, 0.0)
    writer.add("b", make_component(2).data, 0.0)  # generation 2: equal
    stop = threading.Event()

    def write() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            writer.reweight("a", float(step))
            writer.reweight("b", float(step))

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(150):
            r = reader.resolve_all_active()
            wa, wb = (item.weight for item in r.items)
            assert wa - wb == r.generation % 2, (r.generation, wa, wb)
    finally:
        stop.set()
        thread.join()
