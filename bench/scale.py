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

This module measures and writes; bench.scale_workload holds the plans and components,
bench.scale_setups the two registry setups, bench.scale_report the analysis and the plot.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Shared 2-core machine: spinning OpenMP workers collapse throughput under competition.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse
import asyncio
import random
import sqlite3
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench import common
from bench.scale_report import device_cache, draw, o_k_check, targets
from bench.scale_setups import (
    Setup,
    redis_bytes_memory,
    redis_s3_setup,
    s3_memory,
    set_appendonly,
    sqlite_files_setup,
)
from bench.scale_workload import (
    PLANS,
    REGION,
    LargeMaker,
    Plan,
    fetch_defaults,
    small_component,
    stats_ms,
    timed,
)
from loopback.redis_server import redis_binary
from loopback.weed import weed_binary
from tangent import Term, compose
from tangent.delta import delta_nbytes

NAME = "scale"


# -- the registry growing: add, resolve, "*", forget at each size ------------------------------
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


# -- "*" with many active components: staging, compose ------------------------------------------
def stage(s: Setup, digests: list[str], threads: int, waiting: int) -> tuple[float, Any]:
    """Stage ``digests`` through the service's fetch pool (fetch, sha256, decode on
    ``threads`` threads); (seconds, Staged). Raises what ``Fetcher.stage`` raises."""
    from app.fetch import Fetcher
    from app.host_tensors import verified_tensors
    from app.purges import PurgeLog

    # the server's decode path (app.service): verified bytes, decoded without holding the GIL
    fetcher = Fetcher(verified_tensors(s.reg.load_bytes), PurgeLog(), threads=threads,
                      max_waiting=waiting, timeout_s=600.0, store=s.reg.blob_where)
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


def binary_version(args: list[str]) -> str:
    """The first line a ``--version``-style command prints ('' if it cannot run)."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else ""


def versions() -> dict[str, str]:
    import boto3
    import redis

    return {"redis_server": binary_version([redis_binary(), "--version"]),
            "weed": binary_version([weed_binary(), "version"]),
            "boto3": boto3.__version__, "redis_py": redis.__version__,
            "sqlite": sqlite3.sqlite_version}


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
    quick = name != "full"
    common.finish(NAME, quick, machine, settings(plan, name), results,
                  targets(results["setups"], plan), started,
                  lambda png: draw(png, results, quick), out_dir=args.out,
                  stem=NAME if name == "full" else f"{NAME}_{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
