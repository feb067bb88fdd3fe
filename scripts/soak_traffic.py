"""The soak's traffic (scripts/soak.py): worker threads of predictions and admin reads, one
churn thread of lifecycle changes, and the two checks every response goes through — a forget
violation (a response sent after a DELETE receipt that still names the forgotten component) and
an explain-sum mismatch (base logits + the explain contributions differ from the logits).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from bases import Base
from bench.processes import Server
from tangent import encode_component

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
