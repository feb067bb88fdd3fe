"""bench.cost's methods and per-preset settings: which N are measured, up to which N each
method is measured before it is extrapolated, how many interleaved rounds, and the time
budget of each phase (full run and ``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BATCHES = (1, 32)


METHODS = ("a", "b", "c", "c'", "d")


C_PRIME = "c'"


METHOD_LABELS = {
    "a": "(a) TMC, Δ cached",
    "b": "(b) TMC, new composition (Σ on the request)",
    "c": "(c) N full non-linear models",
    "c'": "(c') N non-linear tails, shared trunk",
    "d": "(d) N separate linearized models",
}


@dataclass
class PresetConfig:
    key: str
    preset: str
    options: dict[str, Any]
    ns: tuple[int, ...]
    cap_full: int  # (c) and (d) measured for N <= cap_full, extrapolated beyond
    cap_tails: int  # (c') measured for N <= cap_tails
    repeats: int  # rounds at batch 32
    budget_s: float  # per phase: batch 1, batch 32, compose
    description: str
    seq_len: int = 0  # text presets: tokens per input
    repeats_b1: int = 15  # rounds at batch 1 (cheap, and noisier per call)
    repeats_compose: int = 15


FULL_NS = (1, 2, 5, 10, 20, 50)


MIN_SAMPLE_S = 0.15  # cheap calls are averaged until one sample takes this long


def configs(quick: bool) -> dict[str, PresetConfig]:
    if quick:
        return {
            "effnet-r2": PresetConfig(
                "effnet-r2", "effnet-lite0", {"image_size": 64, "tangent_blocks": 0},
                (1, 2, 5, 10, 50), 2, 50, 2, 45.0,
                "EfficientNet-Lite0 64×64, region R2 = conv head + BN + classifier",
                repeats_b1=6, repeats_compose=6),
            "minilm": PresetConfig(
                "minilm", "minilm", {"tangent_layers": 1, "max_tokens": 32},
                (1, 5, 50), 1, 5, 2, 30.0,
                "MiniLM-L6, region = last encoder layer + classifier, 32 tokens (quick)",
                seq_len=32, repeats_b1=4, repeats_compose=4),
        }
    return {
        "effnet-r2": PresetConfig(
            "effnet-r2", "effnet-lite0", {"image_size": 64, "tangent_blocks": 0},
            FULL_NS, 10, 50, 7, 180.0,
            "EfficientNet-Lite0 64×64, region R2 = conv head + BN + classifier",
            repeats_b1=21, repeats_compose=21),
        "effnet-r3": PresetConfig(
            "effnet-r3", "effnet-lite0", {"image_size": 64, "tangent_blocks": 1},
            FULL_NS, 5, 50, 5, 120.0,
            "EfficientNet-Lite0 64×64, region R3 = last MBConv block + R2",
            repeats_b1=15, repeats_compose=15),
        "minilm": PresetConfig(
            "minilm", "minilm", {"tangent_layers": 1, "max_tokens": 128},
            FULL_NS, 2, 10, 3, 200.0,
            "MiniLM-L6, region = last encoder layer + classifier, 128 tokens", seq_len=128,
            repeats_b1=11, repeats_compose=11),
    }
