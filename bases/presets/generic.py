"""generic: bring any ``nn.Sequential`` of named stages.

options: {"factory": "module:callable", "kwargs": {...}, "input_shape": [..],
"weights": "<path to a safetensors file with θ0>"}; the tangent region is given as
parameter-name patterns. The factory must return an nn.Sequential whose children are
the stages (the tangent region must be a suffix-closed set of stages).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from bases.errors import BaseSpecError
from bases.inputs import TensorPreprocessor
from bases.spec import BaseSpec, Options, dict_option, int_list_option, str_option

NAME = "generic"
INPUT_KIND = "tensor"
DEFAULT_OPTIONS: Options = {}


def build(spec: BaseSpec) -> nn.Sequential:
    factory = str_option(spec.options, "factory")
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise BaseSpecError(f"generic base needs options.factory as 'module:callable', "
                            f"got {factory!r}")
    kwargs = dict_option(spec.options, "kwargs")
    net = getattr(importlib.import_module(module_name), attr)(**kwargs)
    if not isinstance(net, nn.Sequential):
        raise BaseSpecError(f"{factory} must return an nn.Sequential of named stages, "
                            f"got {type(net).__name__}")
    return net


def init_weights(spec: BaseSpec, net: nn.Sequential) -> None:
    from safetensors.torch import load_file

    weights = str_option(spec.options, "weights")
    if not weights:
        raise BaseSpecError("generic base needs options.weights: a safetensors file of θ0")
    net.load_state_dict(load_file(weights), strict=True)


def default_tangent(options: Options) -> list[str]:
    raise BaseSpecError("generic base needs explicit tangent patterns (--tangent 'stage.*')")


def extra_files(options: Options) -> dict[str, Path]:
    return {}


def preprocessor(spec: BaseSpec, base_dir: Path) -> TensorPreprocessor:
    shape = int_list_option(spec.options, "input_shape")
    if not shape:
        raise BaseSpecError("generic base needs options.input_shape, e.g. [64]")
    return TensorPreprocessor(tuple(shape))
