"""Contract: components, versions, settings and generation — on both backends."""

from __future__ import annotations

import pytest
import torch

from registry import ConflictError, InvalidRequestError, NotFoundError, Registry
from tests.registry.support import OTHER_FP, Store, make_component


def test_add_registers_a_new_id(reg: Registry) -> None:
    made = make_component(1)
    result = reg.add("alpha", made.data, 0.5, ["team-a", "vision"], False)
    assert result.created_version and result.generation == 1 and result.id == "alpha"
    info = reg.get("alpha")
    assert (info.digest, info.versions) == (result.digest, [result.digest])
    assert (info.weight, info.tags, info.active) == (0.5, ["team-a", "vision"], False)
    assert info.nbytes == len(made.data)
    assert info.metadata["format"] == "tmc.component/1" and "data" in info.metadata
    assert info.to_dict()["versions"] == [result.digest]


def test_defaults_for_a_new_id(reg: Registry) -> None:
    reg.add("alpha", make_component(1).data)
    info = reg.get("alpha")
    assert (info.weight, info.tags, info.active) == (1.0, [], True)


def test_identical_bytes_are_idempotent(reg: Registry) -> None:
    data = make_component(1).data
    first = reg.add("alpha", data)
    again = reg.add("alpha", data)
    assert again.digest == first.digest and not again.created_version
    assert again.generation == first.generation == reg.generation()
    assert reg.get("alpha").versions == [first.digest]


def test_new_bytes_append_a_version_and_keep_settings(reg: Registry) -> None:
    v1 = reg.add("alpha", make_component(1).data, 0.25, ["x"])
    v2 = reg.add("alpha", make_component(2).data)
    assert v2.created_version and v2.generation == v1.generation + 1
    info = reg.get("alpha")
    assert info.versions == [v1.digest, v2.digest] and info.digest == v2.digest
    assert (info.weight, info.tags) == (0.25, ["x"])


def test_old_bytes_make_their_version_current_again(reg: Registry) -> None:
    d1 = make_component(1).data
    v1 = reg.add("alpha", d1)
    v2 = reg.add("alpha", make_component(2).data)
    back = reg.add("alpha", d1)
    assert not back.created_version and back.generation == v2.generation + 1
    info = reg.get("alpha")
    assert info.digest == v1.digest and info.versions == [v1.digest, v2.digest]


def test_same_bytes_with_a_new_setting_change_only_the_setting(reg: Registry) -> None:
    data = make_component(1).data
    first = reg.add("alpha", data)
    again = reg.add("alpha", data, weight=2.0)
    assert not again.created_version and again.generation == first.generation + 1
    assert reg.get("alpha").weight == 2.0


def test_bytes_of_another_id_are_refused(store: Store, reg: Registry) -> None:
    data = make_component(1).data
    reg.add("alpha", data)
    before, generation = store.state(), reg.generation()
    with pytest.raises(ConflictError, match="already registered as component 'alpha'"):
        reg.add("beta", data)
    assert store.state() == before and reg.generation() == generation
    assert [c.id for c in reg.list()] == ["alpha"]


def test_get_unknown_id(reg: Registry) -> None:
    with pytest.raises(NotFoundError, match="no component 'ghost'"):
        reg.get("ghost")


def test_list_filters_by_tag_and_active(reg: Registry) -> None:
    reg.add("a", make_component(1).data, tags=["red"])
    reg.add("b", make_component(2).data, tags=["red", "blue"], active=False)
    reg.add("c", make_component(3).data)
    assert [c.id for c in reg.list()] == ["a", "b", "c"]
    assert [c.id for c in reg.list(tag="red")] == ["a", "b"]
    assert [c.id for c in reg.list(active=True)] == ["a", "c"]
    assert [c.id for c in reg.list(tag="red", active=False)] == ["b"]
    assert reg.list(tag="green") == []


def test_settings_changes_move_the_generation(reg: Registry) -> None:
    reg.add("a", make_component(1).data)
    g = reg.generation()
    assert reg.reweight("a", -0.5) == g + 1
    assert reg.set_tags("a", ["z", "y", "z"]) == g + 2
    assert reg.set_active("a", False) == g + 3
    assert reg.update("a", weight=3, active=True) == g + 4
    info = reg.get("a")
    assert (info.weight, info.tags, info.active) == (3.0, ["y", "z"], True)
    assert reg.reweight("a", 3.0) == g + 4  # no change, no new generation


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "1", None, True])
def test_bad_weights_are_refused(reg: Registry, weight: object) -> None:
    reg.add("a", make_component(1).data)
    with pytest.raises(InvalidRequestError, match="weight"):
        reg.reweight("a", weight)  # type: ignore[arg-type]
    assert reg.get("a").weight == 1.0


@pytest.mark.parametrize("tags", [["has space"], [""], "single-string", ["x" * 65]])
def test_bad_tags_are_refused(reg: Registry, tags: object) -> None:
    reg.add("a", make_component(1).data)
    with pytest.raises(InvalidRequestError, match="tag"):
        reg.set_tags("a", tags)  # type: ignore[arg-type]


def test_changes_to_unknown_ids(reg: Registry) -> None:
    for change in (lambda: reg.reweight("ghost", 1.0), lambda: reg.set_active("ghost", True),
                   lambda: reg.set_tags("ghost", []), lambda: reg.forget("ghost")):
        with pytest.raises(NotFoundError, match="ghost"):
            change()
    assert reg.generation() == 0


def test_load_tensors_returns_the_exact_tensors(reg: Registry) -> None:
    weight, bias = torch.arange(12.0).reshape(4, 3), torch.tensor([1.0, -2.0, 3.5, 0.0])
    made = make_component(tensors={"fc.weight": weight, "fc.bias": bias})
    digest = reg.add("a", made.data).digest
    tensors = reg.load_tensors(digest)
    assert torch.equal(tensors["fc.weight"], weight) and torch.equal(tensors["fc.bias"], bias)
    assert reg.load_bytes(digest) == made.data


@pytest.mark.parametrize("digest", ["0" * 64, "not-a-digest", "A" * 64])
def test_load_of_an_unknown_digest(reg: Registry, digest: str) -> None:
    with pytest.raises(NotFoundError):
        reg.load_tensors(digest)


def test_a_store_belongs_to_one_base(store: Store) -> None:
    store.open().add("a", make_component(1).data)
    with pytest.raises(ConflictError, match="base"):
        store.open(fingerprint=OTHER_FP)


def test_change_hook_sees_each_new_generation(reg: Registry) -> None:
    seen: list[int] = []
    reg.on_change(seen.append)
    reg.add("a", make_component(1).data)
    reg.reweight("a", 2.0)
    reg.put_composition("c", {"a": 1.0})
    assert seen[:3] == [1, 2, 3]
