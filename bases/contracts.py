"""What the rest of tmc may rely on from a base: the Preprocessor and Preset contracts.

A *preprocessor* turns one request's raw inputs (JSON values as the HTTP layer parsed them,
image bytes, text) into one tensor per input (``decode_inputs``: validation errors are
``InputError``, that request's alone), stacks tensors of many requests into the network's
input (``collate``) and gives a two-row example of that input (``example``). The device
worker, training and the benchmarks see nothing else of it; what only one input kind has
(an image's pixel budget, a tensor's shape) is reached by narrowing to its class in
bases.inputs.

A *preset* is a module of bases/presets/ that knows one backbone: how to build its network,
load θ0, which stages the tangent region covers by default, which extra files (a tokenizer)
the base directory carries, and which preprocessor serves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeAlias

import torch
from torch import nn

from bases.spec import BaseSpec, JSONValue, Options

# The network's input for a batch: a tensor [B, ...], or (ids [B, T], mask [B, T]) for text.
ModelInput: TypeAlias = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Preprocessor(Protocol):
    """Raw inputs -> per-input tensors -> a batch for the network (see the module docstring)."""

    @property
    def input_kind(self) -> str:
        """One of bases.spec.INPUT_KINDS."""
        ...

    def decode_inputs(self, raw: Sequence[object]) -> list[torch.Tensor]:
        """One request's raw inputs -> one tensor each; InputError names the bad input."""
        ...

    def collate(self, items: Sequence[torch.Tensor]) -> ModelInput:
        """Decoded inputs (of any requests) -> the network's input for them, in order."""
        ...

    def example(self) -> ModelInput:
        """The network's input for two example rows (warm-up, forward-AD check)."""
        ...


class Preset(Protocol):
    """A backbone preset module (bases/presets/*.py)."""

    NAME: str
    INPUT_KIND: str
    DEFAULT_OPTIONS: Options

    def build(self, spec: BaseSpec) -> nn.Sequential:
        """The network of named stages, weights uninitialised."""
        ...

    def init_weights(self, spec: BaseSpec, net: nn.Sequential) -> None:
        """Load θ0 into ``net`` (pretrained trunk, seeded head)."""
        ...

    def default_tangent(self, options: dict[str, JSONValue]) -> list[str]:
        """Parameter-name patterns of the default tangent region (ValueError: bad option)."""
        ...

    def extra_files(self, options: dict[str, JSONValue]) -> dict[str, Path]:
        """Files the base directory carries besides θ0: name -> source path."""
        ...

    def preprocessor(self, spec: BaseSpec, base_dir: Path) -> Preprocessor:
        """The preprocessor of a base of this preset stored in ``base_dir``."""
        ...
