"""Registry at scale: add, resolve and forget latency as the registry grows, on two setups.

    python -m bench.scale [--quick | --smoke] [--out DIR]

Setups, each started here on loopback:

- ``redis+s3``: the shared index in a redis-server run as the Helm chart runs it (AOF on,
  ``appendfsync everysec``, no RDB), component bytes in S3 (SeaweedFS ``weed mini``, a
  versioned bucket, so a forget deletes every version), a replica's local byte cache on disk;
- ``sqlite+files``: the embedded index (SQLite, WAL) and content-addressed blob files.

Components are real safetensors files made with ``tangent.encode_component`` for a synthetic
base region: a small head (``head.weight`` 32×32 + ``head.bias`` 32: 4.5 KB per component)
and a large body parameter (``body.weight``, 2,097,152 float32 = 8 MiB). Small components
carry the head only; large ones the body too (8.0 MiB each). 8 MiB is "large" (1,900× a small
one, the size of a tangent over several conv blocks of a small CNN) while 200 of them write
1.6 GiB per setup, which keeps the full run within ~15 minutes on a shared 2-core machine.

What it measures (full run; ``--quick``: 1,000 small + 20 large; ``--smoke``: a few dozen,
results outside bench/results):

1. adding 10,000 small components one by one (every 10th active), median/p90 per batch of
   500, then 200 large ones (inactive), per batch of 50;
2. resolving an explicit composition of k = 1, 10, 100, 1000 random small components at
   registry sizes 100 … 10,000 (interleaved rounds, fresh ids per call): it must cost O(k),
   not O(registry size) — the ratio of latency at the largest size to the smallest, per k,
   is the target;
3. forgetting as the registry grows: a sample of extra small components added and forgotten
   at each size (S3: every version of the object; Redis: the AOF rewrite the forget waits
   for), with AOF on (the chart) and, for the split, off (``CONFIG SET appendonly no``);
   forgetting large components at the end;
4. Redis ``used_memory`` per component with bytes in S3, against a fresh Redis holding the
   bytes too (``TMC_BLOB_URL=redis``);
5. ``"*"`` (``resolve_all_active``) at every size, and with 1,000 active components: staging
   their tensors through the service's real fetch pool (``app.fetch.Fetcher``, default
   4 threads) cold (S3: fetched from the object store; files: read from the OS page cache)
   and warm (the replica's local byte cache), after asking the pool at its default size (it
   refuses more than threads + queue cold versions at once); the CPU compose Σ w_k Δ_k
   (``tangent.compose``), and what the composed Δ and the component tensors weigh against the
   device cache budget (``TMC_CACHE_BYTES``).

Writes bench/results/scale[_quick].json and scale[_quick].png (``--out`` elsewhere).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Shared 2-core machine: spinning OpenMP workers collapse throughput under competition.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import asyncio
import datetime as _dt
import json
import math
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench import common
from bench.servers import S3Endpoint, binary_version, redis_server, weed_server
from registry import Registry, open_registry
from tangent import TangentParam, Term, compose, encode_component
from tangent.delta import delta_nbytes

NAME = "scale"
FP = "5c" * 32  # the synthetic base's fingerprint
BODY_NUMEL = 2_097_152  # float32: 8 MiB
REGION = {
    "head.weight": TangentParam("head.weight", (32, 32), "float32"),
    "head.bias": TangentParam("head.bias", (32,), "float32"),
    "body.weight": TangentParam("body.weight", (BODY_NUMEL,), "float32"),
}
MAX_COMPONENT_BYTES = BODY_NUMEL * 4 + 1024 * 1024
BUCKET = "tmc-scale"
O_K_THRESHOLD = 2.0  # latency at the largest registry / at the smallest, per k


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


# -- one setup ---------------------------------------------------------------------------------
@dataclass
class Setup:
    """One registry setup being measured, and what has been recorded for it."""

    name: str
    reg: Registry
    redis_url: str | None = None
    small_ids: list[str] = field(default_factory=list)
    large_ids: list[str] = field(default_factory=list)
    out: dict[str, Any] = field(default_factory=lambda: {
        "add_small": [], "add_large": [], "resolve": [], "star": [], "forget": [],
        "redis_memory": []})

    def used_memory(self) -> dict[str, int] | None:
        if self.redis_url is None:
            return None
        return redis_memory(self.redis_url)


MEMORY_FIELDS = ("used_memory", "used_memory_dataset", "key_bytes")


def redis_memory(url: str) -> dict[str, int]:
    """INFO memory ``used_memory`` (everything Redis allocated, transient client buffers
    included) and ``used_memory_dataset``; ``key_bytes``: MEMORY USAGE summed over every key
    (exact, allocator size classes included, nothing transient)."""
    import redis

    with redis.Redis.from_url(url) as client:
        info = client.info("memory")
        pipe = client.pipeline(transaction=False)
        for key in client.scan_iter(count=1000):
            pipe.memory_usage(key, samples=0)
        key_bytes = sum(int(n or 0) for n in pipe.execute())
    return {"used_memory": int(info["used_memory"]),
            "used_memory_dataset": int(info["used_memory_dataset"]), "key_bytes": key_bytes}


def per_component(after: dict[str, int], before: dict[str, int], count: int) -> dict[str, float]:
    """Growth per component, for each INFO field."""
    return {f: (after[f] - before[f]) / count for f in MEMORY_FIELDS}


def set_appendonly(url: str, on: bool) -> None:
    """Turn the AOF on or off at runtime (on: Redis writes a fresh base file first)."""
    import redis

    with redis.Redis.from_url(url) as client:
        client.config_set("appendonly", "yes" if on else "no")
        if on:
            while int(client.info("persistence")["aof_rewrite_in_progress"]):
                time.sleep(0.05)


def add_batch(s: Setup, start: int, stop: int, payloads: list[bytes], plan: Plan) -> None:
    """Add small components start..stop-1; record this batch's latency."""
    times = []
    for i in range(start, stop):
        cid = f"s-{i:05d}"
        dt, _ = timed(partial(s.reg.add, cid, payloads[i],
                              active=i % plan.active_every == 0))
        times.append(dt)
        s.small_ids.append(cid)
    s.out["add_small"].append({"count": stop, **stats_ms(times)})


def probe_resolve(s: Setup, plan: Plan, rng: random.Random) -> None:
    """Explicit compositions of k random small ids, k interleaved over rounds."""
    n = len(s.small_ids) + len(s.large_ids)
    ks = [k for k in plan.ks if k <= len(s.small_ids)]
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(plan.resolve_rounds):
        rng.shuffle(ks)
        for k in ks:
            weights = {cid: 1.0 / k for cid in rng.sample(s.small_ids, k)}
            dt, resolved = timed(partial(s.reg.resolve_explicit, weights))
            assert len(resolved.items) == k
            samples[k].append(dt)
    for k in sorted(samples):
        s.out["resolve"].append({"registry_size": n, "k": k, **stats_ms(samples[k])})


def probe_star(s: Setup, plan: Plan) -> None:
    """``"*"``: every active component at its weight (reads every head)."""
    times, active = [], 0
    for _ in range(plan.star_rounds):
        dt, resolved = timed(s.reg.resolve_all_active)
        times.append(dt)
        active = len(resolved.items)
    n = len(s.small_ids) + len(s.large_ids)
    s.out["star"].append({"registry_size": n, "active": active, **stats_ms(times)})


def probe_forget(s: Setup, plan: Plan, tag: str, persistence: str) -> None:
    """Add ``forget_sample`` extra small components (untimed), then forget each (timed)."""
    n = len(s.small_ids) + len(s.large_ids)
    victims = [f"v-{tag}-{n}-{j}" for j in range(plan.forget_sample)]
    for j, cid in enumerate(victims):
        s.reg.add(cid, small_component(10_000_000 + n * 100 + j + (50 if tag == "b" else 0)),
                  active=False)
    times, states = [], []
    for cid in victims:
        dt, receipt = timed(partial(s.reg.forget, cid))
        times.append(dt)
        states.append({p.store: p.state for p in receipt.purged})
    s.out["forget"].append({"registry_size": n, "kind": "small", "persistence": persistence,
                            "receipts": _count_states(states), **stats_ms(times)})


def _count_states(states: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    """store -> state -> how many receipts said it."""
    out: dict[str, dict[str, int]] = {}
    for receipt in states:
        for store, state in receipt.items():
            out.setdefault(store, {}).setdefault(state, 0)
            out[store][state] += 1
    return out


def probe_size(s: Setup, plan: Plan, rng: random.Random) -> None:
    """Everything measured at one registry size."""
    common.log(f"{s.name}: probing at {len(s.small_ids)} components")
    probe_resolve(s, plan, rng)
    probe_star(s, plan)
    persistence = "aof" if s.redis_url else "sqlite-wal"
    probe_forget(s, plan, "a", persistence)
    if s.redis_url:  # the same without the AOF rewrite the forget waits for
        set_appendonly(s.redis_url, False)
        probe_forget(s, plan, "b", "none")
        set_appendonly(s.redis_url, True)
    used = s.used_memory()
    if used is not None:
        s.out["redis_memory"].append({"components": len(s.small_ids), **used})


def add_small_all(s: Setup, plan: Plan, payloads: list[bytes], rng: random.Random) -> None:
    bounds = sorted({*range(plan.batch, plan.small + 1, plan.batch), *plan.sizes,
                     plan.small})
    start = 0
    for stop in bounds:
        add_batch(s, start, stop, payloads, plan)
        start = stop
        if stop in plan.sizes:
            probe_size(s, plan, rng)


def add_large_all(s: Setup, plan: Plan, maker: LargeMaker) -> None:
    for start in range(0, plan.large, plan.large_batch):
        times = []
        for i in range(start, min(plan.large, start + plan.large_batch)):
            data = maker.make(i)
            cid = f"large-{i:04d}"
            dt, _ = timed(partial(s.reg.add, cid, data, active=False))
            times.append(dt)
            s.large_ids.append(cid)
        s.out["add_large"].append({"count": len(s.small_ids) + len(s.large_ids),
                                   "large": len(s.large_ids), **stats_ms(times)})
    used = s.used_memory()
    if used is not None:
        s.out["redis_memory"].append({"components": len(s.small_ids), "large": plan.large,
                                      **used})


# -- "*" with many active components: staging, compose, device cache -------------------------
def fetch_defaults() -> dict[str, Any]:
    """The service's fetch pool and device cache defaults (app.settings)."""
    from app.settings import Settings

    fields = Settings.model_fields
    return {name: fields[name].default
            for name in ("fetch_threads", "fetch_queue_size", "cache_bytes")}


def stage(s: Setup, digests: list[str], threads: int, waiting: int) -> tuple[float, Any]:
    """Stage ``digests`` through the service's fetch pool (fetch, sha256, decode on
    ``threads`` threads); (seconds, Staged). Raises what ``Fetcher.stage`` raises."""
    from app.fetch import Fetcher, PurgeLog

    fetcher = Fetcher(s.reg.load_tensors, PurgeLog(), threads=threads, max_waiting=waiting,
                      timeout_s=600.0, store=s.reg.blob_where)
    try:
        return timed(lambda: asyncio.run(fetcher.stage(digests, 0)))
    finally:
        fetcher.shutdown()


def default_pool_answer(s: Setup, digests: list[str], defaults: dict[str, Any]) -> str:
    """What the service's default pool says to a request needing all of ``digests`` cold."""
    from app.errors import OverloadedError

    try:
        stage(s, digests, defaults["fetch_threads"], defaults["fetch_queue_size"])
    except OverloadedError as exc:
        return f"refused (503): {exc}"
    return "staged"


def compose_seconds(terms: list[Term], rounds: int) -> tuple[list[float], int]:
    """CPU Σ w_k Δ_k times per round, and the composed Δ's bytes."""
    times, nbytes = [], 0
    for _ in range(rounds):
        dt, composed = timed(partial(compose, terms, "none"))
        times.append(dt)
        nbytes = delta_nbytes(composed)
    return times, nbytes


def star_cost(s: Setup, plan: Plan) -> dict[str, Any]:
    """``"*"`` over the active components: resolve, cold and warm staging, compose."""
    defaults = fetch_defaults()
    resolved = s.reg.resolve_all_active()
    digests = sorted({item.digest for item in resolved.items})
    refused = default_pool_answer(s, digests, defaults)  # nothing is fetched when refused
    threads = defaults["fetch_threads"]
    cold_s, staged = stage(s, digests, threads, len(digests))
    warm_s, _ = stage(s, digests, threads, len(digests))
    terms = [Term(item.digest, item.weight, staged.tensors[item.digest])
             for item in resolved.items]
    compose_times, composed_bytes = compose_seconds(terms, plan.compose_rounds)
    component_bytes = sum(delta_nbytes(t) for t in staged.tensors.values())
    return {"active": len(resolved.items), "default_pool": refused,
            "fetch_threads": threads, "stage_cold_s": cold_s, "stage_warm_s": warm_s,
            "compose": stats_ms(compose_times), "composed_delta_bytes": composed_bytes,
            "component_delta_bytes": component_bytes}


# -- large components: load cold/warm, compose, forget -----------------------------------------
def large_costs(s: Setup, plan: Plan) -> dict[str, Any]:
    ids = s.large_ids[:plan.large_loads]
    resolved = s.reg.resolve_explicit({cid: 1.0 / len(ids) for cid in ids})
    cold, warm, terms = [], [], []
    for item in resolved.items:
        dt, tensors = timed(partial(s.reg.load_tensors, item.digest))
        cold.append(dt)
        warm.append(timed(partial(s.reg.load_tensors, item.digest))[0])
        terms.append(Term(item.digest, item.weight, tensors))
    compose_times, composed_bytes = compose_seconds(terms, plan.compose_rounds)
    delta_bytes = delta_nbytes(terms[0].delta)
    median_compose = statistics.median(compose_times)
    return {"components": len(terms), "delta_bytes": delta_bytes,
            "load_cold": stats_ms(cold), "load_warm": stats_ms(warm),
            "compose": stats_ms(compose_times), "composed_delta_bytes": composed_bytes,
            "compose_gb_per_s": len(terms) * delta_bytes / median_compose / 1e9}


def forget_large(s: Setup, plan: Plan) -> None:
    n = len(s.small_ids) + len(s.large_ids)
    times, states = [], []
    for cid in s.large_ids[-plan.large_forgets:]:
        dt, receipt = timed(partial(s.reg.forget, cid))
        times.append(dt)
        states.append({p.store: p.state for p in receipt.purged})
    del s.large_ids[-plan.large_forgets:]
    s.out["forget"].append({"registry_size": n, "kind": "large",
                            "persistence": "aof" if s.redis_url else "sqlite-wal",
                            "receipts": _count_states(states), **stats_ms(times)})


# -- setups ------------------------------------------------------------------------------------
@contextmanager
def aws_env(s3: S3Endpoint) -> Iterator[None]:
    """The ``AWS_*`` variables boto3 reads, pointing at ``s3``; restored afterwards."""
    names = [*s3.env(), "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "AWS_PROFILE",
             "AWS_ENDPOINT_URL_S3"]
    saved = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ.pop(n, None)
    os.environ.update(s3.env())
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@contextmanager
def redis_s3_setup(tmp: Path) -> Iterator[tuple[Setup, dict[str, int]]]:
    """Redis index (AOF on) + S3 bytes in a versioned bucket; and Redis's memory before."""
    with redis_server(tmp / "redis") as url, weed_server(tmp / "weed") as s3, aws_env(s3):
        s3.make_bucket(BUCKET, versioned=True)
        before = redis_memory(url)
        reg = open_registry(registry_dir=None, redis_url=url, base_fingerprint=FP,
                            region=REGION, max_component_bytes=MAX_COMPONENT_BYTES,
                            cache_dir=tmp / "replica-cache", blob_url=f"s3://{BUCKET}/scale")
        try:
            yield Setup("redis+s3", reg, url), before
        finally:
            reg.close()


@contextmanager
def sqlite_files_setup(tmp: Path) -> Iterator[tuple[Setup, dict[str, int]]]:
    reg = open_registry(registry_dir=tmp / "registry", redis_url=None, base_fingerprint=FP,
                        region=REGION, max_component_bytes=MAX_COMPONENT_BYTES)
    try:
        yield Setup("sqlite+files", reg), {}
    finally:
        reg.close()


def run_setup(s: Setup, plan: Plan, payloads: list[bytes], rng: random.Random) -> dict[str, Any]:
    started = time.perf_counter()
    add_small_all(s, plan, payloads, rng)
    common.log(f"{s.name}: '*' over the active components")
    s.out["star_cost"] = star_cost(s, plan)
    common.log(f"{s.name}: adding {plan.large} large components")
    add_large_all(s, plan, LargeMaker())
    s.out["large"] = large_costs(s, plan)
    forget_large(s, plan)
    s.out["wall_s"] = time.perf_counter() - started
    return s.out


def redis_bytes_memory(tmp: Path, plan: Plan, payloads: list[bytes]) -> dict[str, Any]:
    """Redis memory per component when Redis holds the bytes too (TMC_BLOB_URL=redis)."""
    maker = LargeMaker()
    with redis_server(tmp / "redis-bytes", appendonly=False) as url:
        before = redis_memory(url)
        with open_registry(registry_dir=None, redis_url=url, base_fingerprint=FP,
                           region=REGION, max_component_bytes=MAX_COMPONENT_BYTES,
                           blob_url="redis") as reg:
            for i in range(plan.redis_bytes_small):
                reg.add(f"s-{i:05d}", payloads[i], active=False)
            after_small = redis_memory(url)
            for i in range(plan.redis_bytes_large):
                reg.add(f"large-{i:04d}", maker.make(i), active=False)
            after_large = redis_memory(url)
    return {"small": plan.redis_bytes_small, "large": plan.redis_bytes_large,
            "before": before, "after_small": after_small, "after_large": after_large,
            "per_small": per_component(after_small, before, plan.redis_bytes_small),
            "per_large": per_component(after_large, after_small, plan.redis_bytes_large),
            "small_component_bytes": len(payloads[0]),
            "large_component_bytes": len(maker.make(0))}


def s3_memory(out: dict[str, Any], before: dict[str, int], plan: Plan) -> dict[str, Any]:
    """Per component from the S3 setup's readings (victims are forgotten by then)."""
    small = [m for m in out["redis_memory"] if "large" not in m]
    after_small = small[-1]
    after_large = next(m for m in out["redis_memory"] if "large" in m)
    return {"small": plan.small, "large": plan.large, "before": before,
            "after_small": after_small, "after_large": after_large,
            "per_small": per_component(after_small, before, plan.small),
            "per_large": per_component(after_large, after_small, plan.large),
            "by_size": [{"components": m["components"],
                         **per_component(m, before, m["components"])} for m in small]}


# -- analysis ----------------------------------------------------------------------------------
def o_k_check(resolve: list[dict[str, Any]]) -> dict[str, Any]:
    """Per k: median latency at each registry size, and largest-size / smallest-size."""
    out: dict[str, Any] = {}
    for k in sorted({r["k"] for r in resolve}):
        rows = sorted((r["registry_size"], r["median_ms"]) for r in resolve if r["k"] == k)
        out[str(k)] = {"sizes": [n for n, _ in rows], "median_ms": [ms for _, ms in rows],
                       "largest_over_smallest": rows[-1][1] / rows[0][1] if len(rows) > 1
                       else None, "size_ratio": rows[-1][0] / rows[0][0]}
    at_largest = [r for r in resolve
                  if r["registry_size"] == max(x["registry_size"] for x in resolve)]
    if len(at_largest) > 1:
        fit = common.linear_fit([math.log(r["k"]) for r in at_largest],
                                [math.log(r["median_ms"]) for r in at_largest])
        out["loglog_slope_in_k_at_largest_size"] = fit["slope"]
    return out


def device_cache(star: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """What ``"*"`` over the active components asks of the device cache (``TMC_CACHE_BYTES``:
    half for component Δ's, half for composed Δ's), and the same for large components."""
    budget = fetch_defaults()["cache_bytes"]
    half = budget // 2
    active, per_large = star["active"], large["delta_bytes"]
    compose_per_large_s = large["compose"]["median_ms"] / 1e3 / large["components"]
    stage_per_large_s = large["load_cold"]["median_ms"] / 1e3
    return {
        "cache_bytes_default": budget, "component_budget": half, "composed_budget": half,
        "small": {"component_delta_bytes": star["component_delta_bytes"],
                  "fits_component_budget": star["component_delta_bytes"] <= half,
                  "composed_delta_bytes": star["composed_delta_bytes"]},
        "large_if_all_active": {
            "active": active, "component_delta_bytes": active * per_large,
            "components_that_fit": half // per_large,
            "composed_delta_bytes": large["composed_delta_bytes"],
            "estimated_recompose_s": active * compose_per_large_s,
            "estimated_cold_stage_s_sequential": active * stage_per_large_s,
            "note": "each generation change that touches the active set builds a new "
                    "composed Δ: with component Δ's beyond the budget, every one is staged "
                    "from storage again and summed (estimates: per-component medians × "
                    "active)"},
    }


def targets(setups: dict[str, dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """O(k): for the largest k measured at every registry size (100 in the full run), the
    resolve latency at the largest size over that at the smallest (100× more components in
    the full run) stays below O_K_THRESHOLD; O(registry size) would scale with the sizes."""
    k = max(k for k in plan.ks if k <= min(plan.sizes))
    out = {}
    for name, res in setups.items():
        check = res["o_k"].get(str(k), {})
        out[f"resolve is O(k), {name}"] = common.target(
            check.get("largest_over_smallest"), O_K_THRESHOLD, "<=",
            f"k={k}: median resolve latency at registry size {max(plan.sizes)} / at "
            f"{min(plan.sizes)}")
    return out


def versions() -> dict[str, str]:
    import boto3
    import redis

    from bench.servers import redis_binary, weed_binary

    return {"redis_server": binary_version([redis_binary(), "--version"]),
            "weed": binary_version([weed_binary(), "version"]),
            "boto3": boto3.__version__, "redis_py": redis.__version__,
            "sqlite": sqlite3.sqlite_version}


# -- plot --------------------------------------------------------------------------------------
STYLE = {"redis+s3": {"color": "tab:red"}, "sqlite+files": {"color": "tab:blue"}}


def _plot_adds(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        c = STYLE[name]["color"]
        rows = res["add_small"]
        ax.plot([r["count"] for r in rows], [r["median_ms"] for r in rows], "-", color=c,
                label=f"{name} small, median")
        ax.plot([r["count"] for r in rows], [r["p90_ms"] for r in rows], ":", color=c,
                label=f"{name} small, p90")
        big = res["add_large"]
        ax.plot([r["count"] for r in big], [r["median_ms"] for r in big], "s", color=c,
                label=f"{name} 8 MiB, median")
    ax.set(xlabel="components in the registry", ylabel="add latency (ms)", yscale="log",
           title="1. add, per batch")


def _plot_resolve_k(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        sizes = sorted({r["registry_size"] for r in res["resolve"]})
        for j, n in enumerate(sizes):
            rows = sorted((r["k"], r["median_ms"]) for r in res["resolve"]
                          if r["registry_size"] == n)
            ax.plot(*zip(*rows, strict=True), "o-", color=STYLE[name]["color"],
                    alpha=0.35 + 0.65 * j / max(1, len(sizes) - 1),
                    label=f"{name}, N={n}" if j in (0, len(sizes) - 1) else None)
    ax.set(xlabel="k (components in the composition)", ylabel="resolve latency (ms)",
           xscale="log", yscale="log", title="2. resolve vs k (N = registry size)")


def _plot_resolve_n(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        ks = sorted({r["k"] for r in res["resolve"]})
        for j, k in enumerate(ks):
            rows = sorted((r["registry_size"], r["median_ms"]) for r in res["resolve"]
                          if r["k"] == k)
            ax.plot(*zip(*rows, strict=True), "o-", color=STYLE[name]["color"],
                    alpha=0.35 + 0.65 * j / max(1, len(ks) - 1), label=f"{name}, k={k}")
    ax.set(xlabel="registry size N", ylabel="resolve latency (ms)", xscale="log",
           yscale="log", title="2. resolve vs registry size (flat = O(k))")


def _plot_forget(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    marks = {"aof": "o-", "none": "o--", "sqlite-wal": "o-"}
    words = {"aof": "AOF rewrite", "none": "AOF off", "sqlite-wal": "WAL"}
    for name, res in setups.items():
        for persistence in ("aof", "none", "sqlite-wal"):
            rows = [r for r in res["forget"]
                    if r["kind"] == "small" and r["persistence"] == persistence]
            if rows:
                ax.plot([r["registry_size"] for r in rows], [r["median_ms"] for r in rows],
                        marks[persistence], color=STYLE[name]["color"],
                        label=f"{name} ({words[persistence]})")
        big = [r for r in res["forget"] if r["kind"] == "large"]
        ax.plot([r["registry_size"] for r in big], [r["median_ms"] for r in big], "s",
                color=STYLE[name]["color"], label=f"{name} 8 MiB")
    ax.set(xlabel="registry size N", ylabel="forget latency (ms, median)", xscale="log",
           yscale="log", title="3. forget")


def _plot_star(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        rows = res["star"]
        ax.plot([r["registry_size"] for r in rows], [r["median_ms"] for r in rows], "o-",
                color=STYLE[name]["color"], label=f"{name} (active = N/{res['active_every']})")
    ax.set(xlabel="registry size N", ylabel='resolve "*" (ms)', xscale="log", yscale="log",
           title='5. "*" reads every head')


def _plot_memory(ax: Any, memory: dict[str, Any]) -> None:
    """Bars: MEMORY USAGE summed over the keys, per component; text: used_memory growth."""
    cases = [(where, size) for size in ("per_small", "per_large")
             for where in ("bytes_in_s3", "bytes_in_redis")]
    keys = [memory[w][sz]["key_bytes"] for w, sz in cases]
    used = [memory[w][sz]["used_memory"] for w, sz in cases]
    ax.bar(range(4), keys, color=["tab:red", "tab:gray"] * 2)
    ax.set_xticks(range(4), ["small, bytes in S3", "small, bytes in Redis",
                             "8 MiB, bytes in S3", "8 MiB, bytes in Redis"],
                  rotation=20, fontsize=7)
    for i, (kb, ub) in enumerate(zip(keys, used, strict=True)):
        ax.text(i, kb, f"keys {kb / 1024:,.1f} KiB\nused_memory {ub / 1024:,.1f} KiB",
                ha="center", va="bottom", fontsize=6)
    ax.set(ylabel="Redis bytes per component (MEMORY USAGE)", yscale="log",
           ylim=(100, max(keys) * 20), title="4. Redis memory per component")


def draw(png: Path, results: dict[str, Any], quick: bool) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    setups = results["setups"]
    _plot_adds(axes[0][0], setups)
    _plot_resolve_k(axes[0][1], setups)
    _plot_resolve_n(axes[0][2], setups)
    _plot_forget(axes[1][0], setups)
    _plot_star(axes[1][1], setups)
    _plot_memory(axes[1][2], results["redis_memory"])
    for ax in axes.flat[:5]:
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Registry at scale: Redis index + S3 bytes vs SQLite + files"
                 + (" (quick run)" if quick else ""))
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------
def measure(plan: Plan, tmp: Path) -> dict[str, Any]:
    common.log(f"making {plan.small} small components")
    payloads = [small_component(i) for i in range(plan.small)]
    setups: dict[str, dict[str, Any]] = {}
    memory: dict[str, Any] = {}
    for opener in (redis_s3_setup, sqlite_files_setup):
        with opener(tmp / opener.__name__) as (setup, before):
            common.log(f"{setup.name}: {plan.small} small + {plan.large} large components")
            res = run_setup(setup, plan, payloads, random.Random(0))
            if setup.redis_url is not None:
                memory["bytes_in_s3"] = s3_memory(res, before, plan)
        res["active_every"] = plan.active_every
        res["o_k"] = o_k_check(res["resolve"])
        res["device_cache"] = device_cache(res["star_cost"], res["large"])
        setups[setup.name] = res
    common.log("Redis memory with the bytes in Redis too")
    memory["bytes_in_redis"] = redis_bytes_memory(tmp, plan, payloads)
    return {"setups": setups, "redis_memory": memory}


def write(out_dir: Path, stem: str, doc: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def settings(plan: Plan, mode: str) -> dict[str, Any]:
    return {"mode": mode, "plan": asdict(plan), "region": {
                n: list(p.shape) for n, p in REGION.items()},
            "small_component_bytes": len(small_component(0)),
            "large_component_bytes": len(LargeMaker().make(0)),
            "redis": "AOF on, appendfsync everysec, no RDB, noeviction (as the chart)",
            "s3": "weed mini, one versioned bucket, prefix scale/",
            "fetch_defaults": fetch_defaults(), "versions": versions()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1,000 small + 20 large")
    mode.add_argument("--smoke", action="store_true", help="a few dozen (for the tests)")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="result folder")
    args = ap.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan, started = PLANS[name], time.perf_counter()
    machine = common.machine()
    with tempfile.TemporaryDirectory(prefix="tmc-scale-") as tmp:
        results = measure(plan, Path(tmp))
    doc = {"name": NAME, "quick": name != "full", "mode": name,
           "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "wall_seconds": time.perf_counter() - started,
           "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
           "settings": settings(plan, name), "results": results,
           "targets": targets(results["setups"], plan)}
    stem = NAME if name == "full" else f"{NAME}_{name}"
    path = write(args.out, stem, doc)
    draw(args.out / f"{stem}.png", results, name != "full")
    for tname, t in doc["targets"].items():
        common.log(f"{'MET ' if t['met'] else 'MISS'} {tname}: {t['value']:.3g} ({t['note']})")
    common.log(f"wrote {path} in {doc['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
