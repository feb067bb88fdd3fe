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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import httpx  # noqa: E402
import torch  # noqa: E402

from bases import Base, init_base, load_base, make_spec  # noqa: E402
from bases.spec import int_option  # noqa: E402
from bench.common import percentile  # noqa: E402
from bench.processes import Server, rss_bytes, tmc_server  # noqa: E402
from bench.servers import redis_server  # noqa: E402
from tangent import encode_component  # noqa: E402

ATOL, RTOL = 1e-4, 1e-4  # explain-sum tolerance (float32, batches of different sizes)
MAX_REQUESTS = 2_000_000  # hard cap on requests per mode, whatever the duration
MAX_CHURN_OPS = 100_000
MIN_LIVE, MAX_LIVE = 2, 8  # components the churn keeps alive
N_INPUTS = 16
EXAMPLES_KEPT = 5


# ---------------------------------------------------------------------------- state ----

@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    checked_forget: int = 0
    checked_explain: int = 0
    forget_violations: int = 0
    explain_mismatches: int = 0
    max_explain_error: float = 0.0
    examples: list[str] = field(default_factory=list)

    def record(self, kind: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[f"{kind} {status}"] += 1
            self.latencies.append(seconds)

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.examples) < EXAMPLES_KEPT:
                self.examples.append(text)


@dataclass
class Registry:
    """What the churn thread knows: live components and forget receipts (monotonic time)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: dict[str, str] = field(default_factory=dict)  # id -> digest
    forgotten_ids: dict[str, float] = field(default_factory=dict)
    forgotten_digests: dict[str, float] = field(default_factory=dict)

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.live)

    def forgotten_before(self, sent: float, ids: list[str], digests: list[str]) -> list[str]:
        """Names in a response that were forgotten before its request was sent."""
        with self.lock:
            bad = [i for i in ids if self.forgotten_ids.get(i, float("inf")) < sent]
            bad += [d for d in digests
                    if d and any(full.startswith(d) and t < sent
                           for full, t in self.forgotten_digests.items())]
        return bad


# ------------------------------------------------------------------------- traffic ----

class Traffic:
    def __init__(self, servers: list[Server], base: Base, inputs: list[list[float]],
                 base_logits: torch.Tensor, deadline: float, seed: int) -> None:
        self.servers = servers
        self.base = base
        self.inputs = inputs
        self.base_logits = base_logits  # [N_INPUTS, C], the base alone
        self.deadline = deadline
        self.seed = seed
        self.stats = Stats()
        self.registry = Registry()
        self.next_id = 0
        self.model = base.spec.name

    def _done(self) -> bool:
        return time.monotonic() > self.deadline or self.stats.requests >= MAX_REQUESTS

    def _call(self, client: httpx.Client, kind: str, method: str, url: str,
              **kw: Any) -> tuple[httpx.Response | None, float]:
        sent = time.monotonic()
        try:
            response = client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            self.stats.record(kind, 0, time.monotonic() - sent)
            self.stats.problem(f"{kind}: {method} {url}: {type(exc).__name__}: {exc}")
            return None, sent
        self.stats.record(kind, response.status_code, time.monotonic() - sent)
        if response.status_code >= 500:
            self.stats.problem(f"{kind}: {method} {url} -> {response.status_code} "
                               f"{response.text[:200]}")
        return response, sent

    # -- churn ------------------------------------------------------------------------

    def _component(self, seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        delta = {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in self.base.region.items()}
        return encode_component(delta, self.base.fingerprint, {"seed": seed, "data": "soak"})

    def _add(self, client: httpx.Client, rng: random.Random) -> None:
        cid = f"soak-{self.seed % 100000}-{self.next_id}"
        self.next_id += 1
        data = self._component(rng.randrange(2**31))
        r, _ = self._call(client, "add", "PUT", f"/v1/components/{cid}", content=data,
                          params={"weight": rng.choice([0.5, 1.0, -0.5, 2.0])})
        if r is not None and r.status_code in (200, 201):
            with self.registry.lock:
                self.registry.live[cid] = r.json()["digest"]

    def churn(self, rng: random.Random) -> None:
        clients = [httpx.Client(base_url=s.url, headers=s.admin_headers, timeout=60)
                   for s in self.servers]
        try:
            for attempt in range(20):
                if len(self.registry.live) > MIN_LIVE:
                    break
                self._add(clients[attempt % len(clients)], rng)
            for step in range(MAX_CHURN_OPS):
                if self._done():
                    break
                client = clients[step % len(clients)]  # alternate replicas
                live = self.registry.snapshot()
                action = rng.choices(["add", "reweight", "forget", "compose"],
                                     weights=[3, 3, 3, 1])[0]
                if action == "add" and len(live) < MAX_LIVE or len(live) <= MIN_LIVE:
                    self._add(client, rng)
                elif action in ("add", "forget"):
                    self._forget(client, rng.choice(live))
                elif action == "reweight":
                    self._call(client, "reweight", "PATCH", f"/v1/components/{rng.choice(live)}",
                               json={"weight": rng.choice([0.25, 0.5, 1.0, -1.0, 1.5])})
                else:
                    chosen = rng.sample(live, min(len(live), rng.randint(1, 3)))
                    self._call(client, "compose", "PUT", "/v1/compositions/soak-mix",
                               json={"weights": {c: rng.choice([0.5, 1.0, -0.5])
                                                 for c in chosen},
                                     "normalize": rng.choice(["none", "sum", "mean"])})
                time.sleep(rng.uniform(0.02, 0.15))
        finally:
            for c in clients:
                c.close()

    def _forget(self, client: httpx.Client, cid: str) -> None:
        with self.registry.lock:
            self.registry.live.pop(cid, None)  # stop choosing it before the DELETE goes out
        r, _ = self._call(client, "forget", "DELETE", f"/v1/components/{cid}")
        if r is not None and r.status_code == 200:
            receipt = r.json()
            done = time.monotonic()
            with self.registry.lock:
                self.registry.forgotten_ids[cid] = done
                for digest in receipt.get("digests_removed", []):
                    self.registry.forgotten_digests[digest] = done

    # -- inference --------------------------------------------------------------------

    def worker(self, index: int, rng: random.Random) -> None:
        clients = [httpx.Client(base_url=s.url, timeout=60) for s in self.servers]
        try:
            for step in range(MAX_REQUESTS):
                if self._done():
                    break
                client = clients[(index + step) % len(clients)]
                rows = rng.sample(range(len(self.inputs)), rng.randint(1, 3))
                kind = rng.choices(["star", "explicit", "named", "v2", "read"],
                                   weights=[4, 4, 1, 2, 1])[0]
                if kind == "v2":
                    self._v2(client, rows, rng)
                elif kind == "read":
                    self._call(client, "read", "GET", rng.choice(
                        ["/v1/base", "/v2/models/" + self.model, "/readyz"]))
                else:
                    self._predict(client, kind, rows, rng)
        finally:
            for c in clients:
                c.close()

    def _predict(self, client: httpx.Client, kind: str, rows: list[int],
                 rng: random.Random) -> None:
        body: dict[str, Any] = {"inputs": [self.inputs[r] for r in rows], "top_k": 3,
                                "explain": rng.random() < 0.8}
        if kind == "star":
            body["components"] = "*"
        elif kind == "named":
            body["composition"] = "soak-mix"
        else:
            live = self.registry.snapshot()
            chosen = rng.sample(live, min(len(live), rng.randint(1, 3)))
            body["components"] = {c: rng.choice([0.5, 1.0, -1.0]) for c in chosen}
            if rng.random() < 0.3:
                body["normalize"] = rng.choice(["sum", "mean"])
        r, sent = self._call(client, kind, "POST", "/v1/predict", json=body)
        if r is None or r.status_code != 200:
            return
        out = r.json()
        terms = out["provenance"]["components"]
        self._check_forget(kind, sent, [t["id"] for t in terms], [t["digest"] for t in terms],
                           body)
        if body["explain"]:
            self._check_explain(kind, rows, out, body)

    def _v2(self, client: httpx.Client, rows: list[int], rng: random.Random) -> None:
        live = self.registry.snapshot()
        chosen = rng.sample(live, min(len(live), rng.randint(1, 2)))
        comps = rng.choice(["*", ",".join(f"{c}:{rng.choice([0.5, 1.0])}" for c in chosen)])
        data = [v for r in rows for v in self.inputs[r]]
        body = {"inputs": [{"name": "input", "shape": [len(rows), len(self.inputs[0])],
                            "datatype": "FP32", "data": data}],
                "parameters": {"tmc_components": comps}}
        r, sent = self._call(client, "v2", "POST", f"/v2/models/{self.model}/infer",
                             json=body)
        if r is None or r.status_code != 200:
            return
        text = r.json()["parameters"].get("tmc_components", "")
        ids, digests = [], []
        for part in filter(None, text.split(",")):  # "id@digest12:weight"
            cid, _, rest = part.partition("@")
            ids.append(cid)
            digests.append(rest.partition(":")[0])
        self._check_forget("v2", sent, ids, digests, body["parameters"])

    def _check_forget(self, kind: str, sent: float, ids: list[str], digests: list[str],
                      asked: Any) -> None:
        bad = self.registry.forgotten_before(sent, ids, digests)
        with self.stats.lock:
            self.stats.checked_forget += 1
            if bad:
                self.stats.forget_violations += 1
        if bad:
            self.stats.problem(f"forget violation ({kind}): response names {bad}; "
                               f"asked {str(asked)[:200]}")

    def _check_explain(self, kind: str, rows: list[int], out: dict[str, Any],
                       body: dict[str, Any]) -> None:
        worst = 0.0
        bad = False
        for row, output in zip(rows, out["outputs"], strict=True):
            logits = torch.tensor(output["logits"], dtype=torch.float64)
            total = self.base_logits[row].double().clone()
            for values in (output.get("contributions") or {}).values():
                total += torch.tensor(values, dtype=torch.float64)
            err = (logits - total).abs()
            worst = max(worst, float(err.max()))
            if bool((err > ATOL + RTOL * logits.abs()).any()):
                bad = True
        with self.stats.lock:
            self.stats.checked_explain += 1
            self.stats.max_explain_error = max(self.stats.max_explain_error, worst)
            if bad:
                self.stats.explain_mismatches += 1
        if bad:
            self.stats.problem(f"explain-sum mismatch ({kind}): max error {worst:.3g}; "
                               f"asked {str({k: v for k, v in body.items() if k != 'inputs'})}")


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
