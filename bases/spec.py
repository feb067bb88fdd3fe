"""The base spec: everything needed to rebuild θ0's network, besides the tensors.

``options`` are the preset's arguments as they stand in spec.json: JSON values. A preset
reads them through ``int_option`` / ``str_option`` / ``int_list_option``, which refuse a value
of the wrong JSON type with a ``BaseSpecError`` that names the option.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TypeAlias

from bases.errors import BaseSpecError

INPUT_KINDS = ("text", "image", "tensor")

# A value as json.loads returns it.
JSONValue: TypeAlias = "str | int | float | bool | None | list[JSONValue] | dict[str, JSONValue]"
Options: TypeAlias = dict[str, JSONValue]


@dataclass(frozen=True)
class BaseSpec:
    name: str
    preset: str  # "minilm" | "effnet-lite0" | "tiny-mlp" | "generic"
    input_kind: str  # one of INPUT_KINDS
    labels: list[str]
    tangent: list[str]  # glob patterns over parameter names: the tangent region
    head_seed: int
    options: Options = field(default_factory=dict)  # preset arguments
    files: dict[str, str] = field(default_factory=dict)  # extra file name -> sha256

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys): the bytes the fingerprint covers."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BaseSpec:
        return cls(**json.loads(data))


def int_option(options: Mapping[str, JSONValue], name: str) -> int:
    """``options[name]`` as int() reads it (a number or a numeric string)."""
    return _as_int(name, options[name])


def str_option(options: Mapping[str, JSONValue], name: str, default: str = "") -> str:
    value = options.get(name, default)
    if not isinstance(value, str):
        raise BaseSpecError(f"option {name!r} must be a string, got {value!r}")
    return value


def int_list_option(options: Mapping[str, JSONValue], name: str) -> list[int]:
    """A list of integers (e.g. an input shape); [] when the option is absent."""
    value = options.get(name) or []
    if not isinstance(value, list):
        raise BaseSpecError(f"option {name!r} must be a list of integers, got {value!r}")
    return [_as_int(name, v) for v in value]


def dict_option(options: Mapping[str, JSONValue], name: str) -> dict[str, JSONValue]:
    """A JSON object (e.g. keyword arguments); {} when the option is absent."""
    value = options.get(name) or {}
    if not isinstance(value, dict):
        raise BaseSpecError(f"option {name!r} must be an object, got {value!r}")
    return value


def _as_int(name: str, value: JSONValue) -> int:
    if not isinstance(value, int | float | str):
        raise BaseSpecError(f"option {name!r}: {value!r} is not an integer")
    return int(value)
