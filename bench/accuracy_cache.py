"""Trunk caching: the same Δ as recomputing the frozen trunk every step, in less time.

    python -m bench.accuracy_cache [--rows 512] [--epochs 3] [--preset effnet-lite0|minilm]

Trains one tangent component twice on the same rows and seed, once with the trunk outputs
cached (computed once, eval mode) and once recomputing them every step, and reports both
wall times (the cached one including its one trunk pass; best of --repeats alternating
runs after a warm-up) and the relative difference of
the two Δ. Writes bench/results/accuracy_cache_<preset>.json.
"""
# ruff: noqa: E402

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/accuracy.py

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bases import init_base, load_base, make_spec
from bench.accuracy import RESULTS
from bench.common import machine
from training.data import align_labels, load_source, take
from training.tangent_train import TangentConfig, default_kappa, default_lr, train_tangent

DATA = {"effnet-lite0": "fashion-mnist", "minilm": "bbc"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy_cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(DATA), default="effnet-lite0")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        init_base(Path(tmp) / "base", make_spec(args.preset))
        base = load_base(Path(tmp) / "base")
        pool, _ = load_source(DATA[args.preset])
        rows = take(align_labels(pool, base.labels), args.rows, seed=0)
        cfg = TangentConfig(epochs=args.epochs, kappa=default_kappa("shard"),
                            lr=default_lr(base, "shard"), seed=0)
        # warm-up: first-call costs (forward-AD decompositions, allocator) hit neither timing
        train_tangent(base, take(rows, 32), replace(cfg, epochs=1))
        train_tangent(base, take(rows, 32), replace(cfg, epochs=1, cache=False))
        cached_times, fresh_times = [], []
        for _ in range(args.repeats):  # alternate, keep the best of each (shared machines)
            t = time.perf_counter()
            cached = train_tangent(base, rows, cfg)
            cached_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            fresh = train_tangent(base, rows, replace(cfg, cache=False))
            fresh_times.append(time.perf_counter() - t)
        cached_s, fresh_s = min(cached_times), min(fresh_times)
    num = sum(float((cached.delta[n] - fresh.delta[n]).norm() ** 2) for n in cached.delta)
    den = sum(float(cached.delta[n].norm() ** 2) for n in cached.delta)
    result = {
        "preset": args.preset, "rows": len(rows), "epochs": args.epochs,
        "cached_seconds_total": cached_s, "cached_trunk_seconds": cached.trunk_seconds,
        "cached_train_seconds": cached.train_seconds, "uncached_seconds_total": fresh_s,
        "speedup": fresh_s / cached_s, "cached_runs_seconds": cached_times,
        "uncached_runs_seconds": fresh_times, "delta_relative_difference": (num / den) ** 0.5,
        "machine": machine(),
    }
    out = RESULTS / f"accuracy_cache_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
