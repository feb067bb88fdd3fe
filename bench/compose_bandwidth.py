"""Σ w_k Δ_k bandwidth under the OpenMP wait policy `tmc serve` runs with, and under PASSIVE.

    python -m bench.compose_bandwidth [--quick]

bench.cost times the sum of a new composition (``tangent.compose``) next to a plain
``Tensor.copy_`` of the same N·|Δ| bytes, in a process that sets OMP_WAIT_POLICY=PASSIVE
(the benchmarks' setting for shared machines). PASSIVE makes every parallel op wake its
threads, which a sum of N components (two ops per component and parameter) pays N times
and one copy pays once. ``tmc serve`` does not set the policy. This benchmark times both
in child processes, one per policy, for the default tangent region of each preset:
random float32 Δ's, interleaved shuffled rounds, ratio per round. Writes
bench/results/compose_bandwidth[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

NAME = "compose_bandwidth"
NS = (1, 2, 5, 10, 20, 50)
POLICIES = {"service default (unset)": None, "PASSIVE (benchmarks)": "PASSIVE"}


# -- child: imports torch only here, after the parent chose the environment --------------------
def child(preset: str, rounds: int, ns: list[int]) -> dict[str, Any]:
    import tempfile

    import torch

    from bases import init_base, load_base, make_spec
    from tangent import Term, compose

    with tempfile.TemporaryDirectory() as tmp:
        init_base(Path(tmp) / "base", make_spec(preset))
        region = {n: p.shape for n, p in load_base(Path(tmp) / "base").region.items()}
    gen = torch.Generator().manual_seed(0)
    deltas = [{n: torch.randn(s, generator=gen) for n, s in region.items()}
              for _ in range(max(ns))]
    numel = sum(t.numel() for t in deltas[0].values())
    cases: dict[str, Callable[[], object]] = {}
    for n in ns:
        terms = [Term(f"{k:064x}", 1.0 / n, deltas[k]) for k in range(n)]
        src, dst = torch.randn(n * numel), torch.empty(n * numel)
        cases[f"compose|{n}"] = partial(compose, terms, "none")
        cases[f"copy|{n}"] = partial(dst.copy_, src)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    order = list(cases)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            t = time.perf_counter()
            cases[key]()
            samples[key].append(time.perf_counter() - t)
    return {"delta_bytes": numel * 4, "threads": torch.get_num_threads(), "samples": samples}


# -- parent --------------------------------------------------------------------------------------
def run_child(preset: str, policy: str | None, rounds: int, ns: list[int]) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-m", "bench.compose_bandwidth", "--child", preset,
                          "--rounds", str(rounds), "--ns", ",".join(map(str, ns))],
                         env=env, capture_output=True, text=True, check=True, timeout=900)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def analyse(raw: dict[str, Any], ns: list[int]) -> list[dict[str, Any]]:
    from bench import common

    rows = []
    for n in ns:
        payload = n * raw["delta_bytes"] / 1e9
        comp, copy = raw["samples"][f"compose|{n}"], raw["samples"][f"copy|{n}"]
        rows.append({"n": n, "gb": payload,
                     "compose_gb_per_s": payload / statistics.median(comp),
                     "copy_gb_per_s": payload / statistics.median(copy),
                     "compose_over_copy": common.ratio_samples(copy, comp)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compose_bandwidth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    ap.add_argument("--presets", default="effnet-lite0,minilm")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ns", default=",".join(map(str, NS)), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.rounds or 15, ns)))
        return 0
    from bench import common

    started = time.perf_counter()
    rounds = args.rounds or (5 if args.quick else 15)
    results: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for preset in args.presets.split(","):
        for label, policy in POLICIES.items():
            common.log(f"{preset}, OMP_WAIT_POLICY {label}: {rounds} rounds")
            raw = run_child(preset, policy, rounds, ns)
            rows = analyse(raw, ns)
            results.setdefault(preset, {})[label] = {
                "delta_bytes": raw["delta_bytes"], "threads": raw["threads"], "points": rows}
            last = rows[-1]
            targets[f"{preset}: Σ bandwidth / copy at N={last['n']}, OMP_WAIT_POLICY "
                    f"{label}"] = common.target(
                last["compose_over_copy"]["median"], 0.5, ">=",
                f"compose {last['compose_gb_per_s']:.2f} GB/s vs copy "
                f"{last['copy_gb_per_s']:.2f} GB/s")
    settings = {"ns": ns, "rounds": rounds, "policies": POLICIES,
                "definition": "GB/s = N·|Δ| bytes / median seconds; ratio per round"}
    common.finish(NAME, args.quick, common.machine("cpu"), settings, results, targets, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
