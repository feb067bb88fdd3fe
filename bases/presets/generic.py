"""generic: bring any ``nn.Sequential`` of named stages.

options: {"factory": "module:callable", "kwargs": {...}, "input_shape": [..],
"weights": "<path to a safetensors file with θ0>"}; the tangent region is given as
parameter-name patterns. The factory must return an nn.Sequential whose children are
the stages (the tangent region must be a suffix-closed set of stages).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from bases.errors import BaseSpecError
from bases.inputs import TensorPreprocessor
from bases.spec import BaseSpec

NAME = "generic"
INPUT_KIND = "tensor"
DEFAULT_OPTIONS: dict[str, Any] = {}


def build(spec: BaseSpec) -> nn.Sequential:
    factory = spec.options.get("factory", "")
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise BaseSpecError(f"generic base needs options.factory as 'module:callable', "
                            f"got {factory!r}")
    net = getattr(importlib.import_module(module_name), attr)(**spec.options.get("kwargs", {}))
    if not isinstance(net, nn.Sequential):
        raise BaseSpecError(f"{factory} must return an nn.Sequential of named stages, "
                            f"got {type(net).__name__}")
    return net


def init_weights(spec: BaseSpec, net: nn.Sequential) -> None:
    from safetensors.torch import load_file

    weights = spec.options.get("weights")
    if not weights:
        raise BaseSpecError("generic base needs options.weights: a safetensors file of θ0")
    net.load_state_dict(load_file(weights), strict=True)


def default_tangent(options: dict[str, Any]) -> list[str]:
    raise BaseSpecError("generic base needs explicit tangent patterns (--tangent 'stage.*')")


def extra_files(options: dict[str, Any]) -> dict[str, Path]:
    return {}


def preprocessor(spec: BaseSpec, base_dir: Path) -> TensorPreprocessor:
    shape = spec.options.get("input_shape")
    if not shape:
        raise BaseSpecError("generic base needs options.input_shape, e.g. [64]")
    return TensorPreprocessor(tuple(int(s) for s in shape))
