"""Contract: every invalid add is refused with a typed error that says what is wrong, and
nothing is stored — on both backends."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

import tangent
from registry import InvalidComponentError, InvalidIdError, InvalidRequestError, Registry
from tests.registry.support import FP, OTHER_FP, Store, make_component

GOOD = {"fc.weight": torch.ones(4, 3), "fc.bias": torch.zeros(4)}


def _tensors(**changes: torch.Tensor) -> bytes:
    return make_component(tensors={**GOOD, **changes}).data


def _bad_bodies() -> list[tuple[str, bytes, type[tangent.ComponentError], str]]:
    good = make_component(1).data
    return [
        ("wrong-base", make_component(1, fingerprint=OTHER_FP).data, tangent.WrongBaseError,
         "made for base eeee"),
        ("unknown-tensor", _tensors(**{"fc.extra": torch.ones(2)}), tangent.UnknownTensorError,
         "'fc.extra' is not a parameter of the tangent region"),
        ("wrong-shape", _tensors(**{"fc.weight": torch.ones(3, 4)}), tangent.WrongShapeError,
         r"'fc.weight' has shape \[3, 4\], expected \[4, 3\]"),
        ("wrong-dtype", _tensors(**{"fc.bias": torch.zeros(4, dtype=torch.float64)}),
         tangent.WrongDtypeError, "'fc.bias' has dtype float64"),
        ("nan", _tensors(**{"fc.bias": torch.tensor([0.0, float("nan"), 0.0, 0.0])}),
         tangent.NonFiniteError, "'fc.bias' has NaN or infinite values"),
        ("inf", _tensors(**{"fc.weight": torch.full((4, 3), float("inf"))}),
         tangent.NonFiniteError, "NaN or infinite"),
        ("no-metadata", save(GOOD), tangent.MissingMetadataError, "metadata lacks"),
        ("wrong-format", save(GOOD, {"format": "other/9", "base_fingerprint": FP}),
         tangent.MissingMetadataError, "format is 'other/9'"),
        ("not-safetensors", b"GIF89a definitely not a component", tangent.NotSafetensorsError,
         "not a safetensors file|truncated or not safetensors"),
        ("truncated", good[:-9], tangent.NotSafetensorsError, "truncated|not a valid safetensors"),
        ("truncated-header", good[:40], tangent.NotSafetensorsError, "truncated"),
        ("empty", b"", tangent.NotSafetensorsError, "body is 0 bytes"),
    ]


@pytest.mark.parametrize(("case", "body", "cause", "message"), _bad_bodies(),
                         ids=[c[0] for c in _bad_bodies()])
def test_invalid_components_are_refused(store: Store, reg: Registry, case: str, body: bytes,
                                        cause: type[Exception], message: str) -> None:
    reg.add("keep", make_component(99).data)
    before, generation = store.state(), reg.generation()
    with pytest.raises(InvalidComponentError, match=message) as info:
        reg.add("new", body)
    assert isinstance(info.value.cause, cause) and info.value.__cause__ is info.value.cause
    assert store.state() == before and reg.generation() == generation
    assert [c.id for c in reg.list()] == ["keep"]


def test_a_body_over_the_size_limit_is_refused(store: Store) -> None:
    reg = store.open(max_bytes=200)
    before = store.state()
    with pytest.raises(InvalidComponentError, match=r"over the limit of 200 bytes") as info:
        reg.add("big", make_component(1).data)
    assert isinstance(info.value.cause, tangent.ComponentTooLargeError)
    assert store.state() == before and reg.list() == [] and reg.generation() == 0


@pytest.mark.parametrize("bad_id", ["", "A", "-a", ".a", "a" * 65, "a/b", "../x", "a b",
                                    "ä", "a\n", None, 7])
def test_bad_ids_are_refused(store: Store, reg: Registry, bad_id: object) -> None:
    before = store.state()
    with pytest.raises(InvalidIdError, match=r"\[a-z0-9._-\]"):
        reg.add(bad_id, make_component(1).data)  # type: ignore[arg-type]
    assert store.state() == before and reg.generation() == 0


@pytest.mark.parametrize("good_id", ["a", "0", "a" * 64, "team.a_b-1"])
def test_good_ids_are_accepted(reg: Registry, good_id: str) -> None:
    assert reg.add(good_id, make_component(1).data).id == good_id


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight": float("nan")}, "finite"), ({"tags": ["no spaces"]}, "tag"),
    ({"active": "yes"}, "active"),
])
def test_bad_settings_on_add_are_refused(store: Store, reg: Registry, kwargs: dict,
                                         message: str) -> None:
    before = store.state()
    with pytest.raises(InvalidRequestError, match=message):
        reg.add("a", make_component(1).data, **kwargs)
    assert store.state() == before and reg.list() == []


def test_a_non_bytes_body_is_refused(reg: Registry) -> None:
    with pytest.raises(InvalidRequestError, match="bytes"):
        reg.add("a", "text")  # type: ignore[arg-type]
