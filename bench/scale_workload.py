"""What bench.scale puts in a registry: the synthetic base region, the run plans, the small
and large components, and how one call is timed and summarized.

Components are real safetensors files (``tangent.encode_component``) for a synthetic region:
a small head (``head.weight`` 32×32 + ``head.bias`` 32: 4.5 KB per component) and a large
body (``body.weight``, 2,097,152 float32 = 8 MiB). Every component is new bytes (a new
digest). Latencies are summarized as median / p90 / min / max in ms (common.percentile).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench import common
from tangent import TangentParam, encode_component

FP = "5c" * 32  # the synthetic base's fingerprint


BODY_NUMEL = 2_097_152  # float32: 8 MiB


REGION = {
    "head.weight": TangentParam("head.weight", (32, 32), "float32"),
    "head.bias": TangentParam("head.bias", (32,), "float32"),
    "body.weight": TangentParam("body.weight", (BODY_NUMEL,), "float32"),
}


MAX_COMPONENT_BYTES = BODY_NUMEL * 4 + 1024 * 1024


BUCKET = "tmc-scale"


@dataclass(frozen=True)
class Plan:
    small: int
    large: int
    batch: int
    large_batch: int
    sizes: tuple[int, ...]  # registry sizes where resolve/forget/"*" are probed
    ks: tuple[int, ...] = (1, 10, 100, 1000)
    resolve_rounds: int = 15
    star_rounds: int = 5
    forget_sample: int = 20
    large_forgets: int = 20
    large_loads: int = 20  # loaded cold, then warm, then composed
    compose_rounds: int = 5
    redis_bytes_small: int = 1000
    redis_bytes_large: int = 5
    star_active: int = 1000

    @property
    def active_every(self) -> int:
        """Every n-th small component is active, so that ``star_active`` are at the end."""
        return max(1, self.small // self.star_active)


PLANS = {
    "full": Plan(small=10_000, large=200, batch=500, large_batch=50,
                 sizes=(100, 1000, 2500, 5000, 10_000)),
    "quick": Plan(small=1000, large=20, batch=100, large_batch=10, sizes=(100, 500, 1000),
                  resolve_rounds=9, star_rounds=3, forget_sample=10, large_forgets=5,
                  large_loads=5, compose_rounds=3, redis_bytes_small=300,
                  redis_bytes_large=2),
    "smoke": Plan(small=40, large=2, batch=20, large_batch=2, sizes=(20, 40), ks=(1, 10),
                  resolve_rounds=2, star_rounds=1, forget_sample=2, large_forgets=1,
                  large_loads=1, compose_rounds=1, redis_bytes_small=10,
                  redis_bytes_large=1, star_active=10),
}


# -- components ------------------------------------------------------------------------------
def small_component(seed: int) -> bytes:
    """A head-only component (4.5 KB): random float32 Δ, provenance naming its seed."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {"head.weight": torch.randn(32, 32, generator=gen) * 1e-2,  # [32, 32]
               "head.bias": torch.randn(32, generator=gen) * 1e-2}  # [32]
    return encode_component(tensors, FP, {"bench": "scale", "seed": seed})


class LargeMaker:
    """8 MiB components: one random body [BODY_NUMEL] whose first element differs per
    component (so every one is new bytes, a new digest), plus a head."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.body = torch.randn(BODY_NUMEL, generator=gen) * 1e-3  # [2097152]
        self.head = torch.randn(32, 32, generator=gen) * 1e-2  # [32, 32]

    def make(self, seed: int) -> bytes:
        self.body[0] = float(seed) + 0.5
        return encode_component({"body.weight": self.body, "head.weight": self.head}, FP,
                                {"bench": "scale", "large": seed})


# -- statistics --------------------------------------------------------------------------------
def stats_ms(seconds: list[float]) -> dict[str, Any]:
    """median / p90 / min / max in milliseconds, and the count."""
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        return {"median_ms": None, "p90_ms": None, "min_ms": None, "max_ms": None, "n": 0}
    return {"median_ms": statistics.median(ms), "p90_ms": common.percentile(ms, 90),
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# -- the service settings the costs are measured against ------------------------------------
def fetch_defaults() -> dict[str, Any]:
    """The service's fetch pool and device cache defaults (app.settings)."""
    from app.settings import Settings

    fields = Settings.model_fields
    return {name: fields[name].default
            for name in ("fetch_threads", "fetch_queue_size", "cache_bytes")}
