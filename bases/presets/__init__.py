"""Backbone presets: each module satisfies bases.contracts.Preset (NAME, INPUT_KIND,
DEFAULT_OPTIONS, build, init_weights, default_tangent, extra_files, preprocessor)."""

from __future__ import annotations

from bases.contracts import Preset
from bases.errors import BaseSpecError
from bases.presets import effnet, generic, minilm, tiny

_MODULES: list[Preset] = [minilm, effnet, tiny, generic]
PRESETS: dict[str, Preset] = {m.NAME: m for m in _MODULES}
DEFAULT_LABELS: dict[str, list[str]] = {
    "minilm": minilm.BBC_LABELS,
    "effnet-lite0": effnet.FASHION_LABELS,
    "tiny-mlp": [str(i) for i in range(10)],
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise BaseSpecError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
