"""Backbone presets. Each module exposes NAME, INPUT_KIND, DEFAULT_OPTIONS, build,
init_weights, default_tangent, extra_files and preprocessor."""

from __future__ import annotations

from types import ModuleType

from bases.errors import BaseSpecError
from bases.presets import effnet, generic, minilm, tiny

PRESETS: dict[str, ModuleType] = {m.NAME: m for m in (minilm, effnet, tiny, generic)}
DEFAULT_LABELS: dict[str, list[str]] = {
    "minilm": minilm.BBC_LABELS,
    "effnet-lite0": effnet.FASHION_LABELS,
    "tiny-mlp": [str(i) for i in range(10)],
}


def get_preset(name: str) -> ModuleType:
    try:
        return PRESETS[name]
    except KeyError:
        raise BaseSpecError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
