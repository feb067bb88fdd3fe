"""The base spec: everything needed to rebuild θ0's network, besides the tensors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

INPUT_KINDS = ("text", "image", "tensor")


@dataclass(frozen=True)
class BaseSpec:
    name: str
    preset: str  # "minilm" | "effnet-lite0" | "tiny-mlp" | "generic"
    input_kind: str  # one of INPUT_KINDS
    labels: list[str]
    tangent: list[str]  # glob patterns over parameter names: the tangent region
    head_seed: int
    options: dict[str, Any] = field(default_factory=dict)  # preset arguments
    files: dict[str, str] = field(default_factory=dict)  # extra file name -> sha256

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys): the bytes the fingerprint covers."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BaseSpec:
        return cls(**json.loads(data))
