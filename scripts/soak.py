"""Soak test (issue 14; `make soak`, not part of `make test`).

N minutes (default 5) of mixed traffic with lifecycle churn, first on one `tmc serve`, then on
two replicas sharing one redis-server. Everything is started here on 127.0.0.1 (a tiny-mlp
base in a temporary folder, the servers, redis) and stopped at the end; nothing else is
contacted.

Traffic (worker threads): native predictions with "*", with explicit compositions of live
components, with the named composition, explain=true on most of them; V2 infer with
tmc_components; a few admin reads. Churn (one thread): add components (fresh ids, never
reused), reweight, forget, and rewrite a named composition.

Printed per mode: requests, status counts, p50/p99 latency, server RSS at start and end,
forget violations and explain-sum mismatches, both of which must be 0:

* forget violation: a response to a request sent after a DELETE receipt came back that still
  names the forgotten component (by id or by one of the receipt's digests), on any replica;
* explain-sum mismatch: base logits + the sum of the explain contributions differ from the
  returned logits beyond float tolerance.

Exit status 1 when either is non-zero or any 5xx came back.

    python scripts/soak.py [MINUTES] [--mode single|replicas|both] [--workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import torch  # noqa: E402
from soak_traffic import ATOL, N_INPUTS, RTOL, Stats, Traffic  # noqa: E402

from bases import Base, init_base, load_base, make_spec  # noqa: E402
from bases.spec import int_option  # noqa: E402
from bench.common import percentile  # noqa: E402
from bench.processes import Server, rss_bytes, tmc_server  # noqa: E402
from loopback.redis_server import redis_server  # noqa: E402

# ---------------------------------------------------------------------------- modes ----

def _percentile(values: list[float], q: int) -> float:
    found = percentile(values, q)
    return float("nan") if found is None else found


def _soak_inputs(base: Base, rng: random.Random) -> list[list[float]]:
    """N_INPUTS random feature rows for the tiny-mlp base (its in_features option, else 64)."""
    features = int_option({"in_features": 64, **(base.spec.options or {})}, "in_features")
    return [[round(rng.gauss(0, 1), 4) for _ in range(features)] for _ in range(N_INPUTS)]


def _base_logits(server: Server, inputs: list[list[float]]) -> torch.Tensor:
    r = httpx.post(f"{server.url}/v1/predict", json={"inputs": inputs}, timeout=60)
    r.raise_for_status()
    return torch.tensor([o["logits"] for o in r.json()["outputs"]])


def _drive(traffic: Traffic, workers: int, minutes: float, seed: int) -> float:
    """Runs the churn thread and `workers` traffic threads to the deadline; seconds taken."""
    threads = [threading.Thread(target=traffic.churn, args=(random.Random(seed + 1),),
                                daemon=True)]
    threads += [threading.Thread(target=traffic.worker, args=(i, random.Random(seed + 2 + i)),
                                 daemon=True) for i in range(workers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(minutes * 60 + 120)
    return time.monotonic() - start


def _print_traffic(st: Stats, elapsed: float) -> None:
    print(f"requests: {st.requests} ({st.requests / max(elapsed, 1e-9):.1f}/s)")
    print("status counts (kind status: n):")
    for key in sorted(st.statuses):
        print(f"  {key}: {st.statuses[key]}")
    ms = [x * 1000 for x in st.latencies]
    print(f"latency ms: p50 {_percentile(ms, 50):.1f}  p99 {_percentile(ms, 99):.1f}  "
          f"max {max(ms, default=float('nan')):.1f}")


def _print_rss(rss_start: list[int], rss_end: list[int]) -> None:
    for i, (a, b) in enumerate(zip(rss_start, rss_end, strict=True)):
        print(f"server {i} RSS: start {a / 2**20:.1f} MiB, end {b / 2**20:.1f} MiB "
              f"({(b - a) / 2**20:+.1f} MiB)")


def _verdict(traffic: Traffic) -> bool:
    """Prints the checks (forget, explain sum, 5xx, transport errors); True when all are 0."""
    st = traffic.stats
    five = sum(n for key, n in st.statuses.items() if key.rsplit(" ", 1)[1].startswith("5"))
    lost = sum(n for key, n in st.statuses.items() if key.endswith(" 0"))
    print(f"components added {traffic.next_id}, forgotten {len(traffic.registry.forgotten_ids)}")
    print(f"forget violations: {st.forget_violations} (of {st.checked_forget} checked responses)")
    print(f"explain-sum mismatches: {st.explain_mismatches} (of {st.checked_explain} checked; "
          f"max |error| {st.max_explain_error:.2e}, tolerance {ATOL:g} + {RTOL:g}·|logit|)")
    print(f"5xx: {five}, transport errors: {lost}")
    for text in st.examples:
        print(f"  ! {text}")
    return st.forget_violations == 0 and st.explain_mismatches == 0 and five == 0 and lost == 0


def run_mode(name: str, servers: list[Server], base: Base, minutes: float, workers: int,
             seed: int) -> bool:
    """One soak on `servers` (all serving `base`); prints its report, True when it passed."""
    rng = random.Random(seed)
    inputs = _soak_inputs(base, rng)
    base_logits = _base_logits(servers[0], inputs)
    for other in servers[1:]:
        torch.testing.assert_close(_base_logits(other, inputs), base_logits)
    rss_start = [rss_bytes(s.proc.pid) for s in servers]
    traffic = Traffic(servers, base, inputs, base_logits,
                      time.monotonic() + minutes * 60, seed)
    elapsed = _drive(traffic, workers, minutes, seed)
    rss_end = [rss_bytes(s.proc.pid) for s in servers]
    print(f"== {name}: {len(servers)} server(s), {workers} workers + 1 churn, "
          f"{elapsed:.0f} s ==")
    _print_traffic(traffic.stats, elapsed)
    _print_rss(rss_start, rss_end)
    return _verdict(traffic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", nargs="?", type=float, default=5.0,
                        help="minutes of traffic per mode (default 5)")
    parser.add_argument("--mode", choices=["single", "replicas", "both"], default="both")
    parser.add_argument("--workers", type=int, default=4, help="traffic threads (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60 or not 1 <= args.workers <= 64:
        parser.error("minutes must be in (0, 1440] and workers in [1, 64]")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"soak: {args.minutes:g} min per mode, seed {seed} (replay: --seed {seed})")
    ok = True
    with tempfile.TemporaryDirectory(prefix="tmc-soak-") as tmp:
        work = Path(tmp)
        base_dir = work / "base"
        init_base(base_dir, make_spec("tiny-mlp", head_seed=3))
        base = load_base(base_dir)
        env = {"TMC_MAX_QUEUE_DELAY_MS": "2"}
        if args.mode in ("single", "both"):
            with tmc_server(base_dir, work / "single", env=env, ready_timeout_s=120) as server:
                ok &= run_mode("single server", [server], base, args.minutes, args.workers,
                               seed)
        if args.mode in ("replicas", "both"):
            with contextlib.ExitStack() as stack:
                url = stack.enter_context(redis_server(work / "redis", appendonly=False))
                servers = [stack.enter_context(tmc_server(
                    base_dir, work / f"replica{i}", ready_timeout_s=120,
                    env={**env, "TMC_REDIS_URL": url,
                         "TMC_BLOB_CACHE_DIR": str(work / f"replica{i}" / "blobs")}))
                    for i in range(2)]
                ok &= run_mode("two replicas over one redis", servers, base, args.minutes,
                               args.workers, seed)
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
