"""tiny-mlp: a seeded 3-stage MLP over numeric vectors, for tests and smoke runs."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from bases.inputs import TensorPreprocessor
from bases.spec import BaseSpec, Options, int_option

NAME = "tiny-mlp"
INPUT_KIND = "tensor"
DEFAULT_OPTIONS: Options = {"in_features": 64, "hidden": 32, "tangent_stages": 2}


def build(spec: BaseSpec) -> nn.Sequential:
    o = {**DEFAULT_OPTIONS, **spec.options}
    d, h, c = int_option(o, "in_features"), int_option(o, "hidden"), len(spec.labels)
    return nn.Sequential(OrderedDict([
        ("hidden1", nn.Sequential(nn.Linear(d, h), nn.Tanh())),
        ("hidden2", nn.Sequential(nn.Linear(h, h), nn.Tanh())),
        ("classifier", nn.Linear(h, c)),
    ]))


def init_weights(spec: BaseSpec, net: nn.Sequential) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(spec.head_seed)
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()


def default_tangent(options: Options) -> list[str]:
    stages = ["hidden1", "hidden2", "classifier"]
    k = int_option({**DEFAULT_OPTIONS, **options}, "tangent_stages")
    if not 1 <= k <= len(stages):
        raise ValueError(f"tangent_stages must be within 1..{len(stages)}, got {k}")
    return [f"{s}.*" for s in stages[-k:]]


def extra_files(options: Options) -> dict[str, Path]:
    return {}


def preprocessor(spec: BaseSpec, base_dir: Path) -> TensorPreprocessor:
    return TensorPreprocessor((int_option({**DEFAULT_OPTIONS, **spec.options}, "in_features"),))
