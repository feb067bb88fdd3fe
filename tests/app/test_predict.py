"""Serving behaviour through real HTTP: outputs equal the offline linearized model."""

from __future__ import annotations

import concurrent.futures as cf
import random

import httpx
import torch

from bases import Base
from tangent import Term, compose
from tests.app.conftest import component_bytes, fresh_seed, random_delta


def offline(base: Base, x: torch.Tensor, parts: list[tuple[int, float]]) -> torch.Tensor:
    """f0 + J·Σ w_k Δ_k computed directly, no service involved."""
    terms = [Term(f"{seed:012d}", w, random_delta(base, seed)) for seed, w in parts]
    delta = compose(terms) if terms else None
    return base.net.forward(x, delta)


def push(admin: httpx.Client, base: Base, cid: str, seed: int, **params: object) -> dict:
    r = admin.put(f"/v1/components/{cid}", content=component_bytes(base, seed), params=params)
    assert r.status_code == 201, r.text
    return r.json()


def predict(client: httpx.Client, x: torch.Tensor, **body: object) -> dict:
    r = client.post("/v1/predict", json={"inputs": x.tolist(), **body})
    assert r.status_code == 200, r.text
    return r.json()


def logits(resp: dict) -> torch.Tensor:
    return torch.tensor([o["logits"] for o in resp["outputs"]])


def test_composition_equals_offline_linearized_model(admin_client, client, tiny_base):
    seeds = [fresh_seed() for _ in range(3)]
    for i, s in enumerate(seeds):
        push(admin_client, tiny_base, f"c{i}", s)
    x = torch.randn(4, 64)
    weights = {"c0": 0.5, "c1": 0.3, "c2": -0.2}
    got = logits(predict(client, x, components=weights))
    want = offline(tiny_base, x, [(s, w) for s, w in zip(seeds, weights.values(), strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"seeds {seeds}")


def test_linearity_composed_equals_sum_of_single_contributions(admin_client, client, tiny_base):
    seeds = [fresh_seed() for _ in range(3)]
    for i, s in enumerate(seeds):
        push(admin_client, tiny_base, f"c{i}", s)
    x = torch.randn(3, 64)
    f0 = logits(predict(client, x))
    weights = [0.7, -1.3, 2.0]
    singles = [logits(predict(client, x, components={f"c{i}": 1.0})) for i in range(3)]
    composed = logits(predict(client, x, components={f"c{i}": w for i, w in enumerate(weights)}))
    expected = f0 + sum(w * (y - f0) for w, y in zip(weights, singles, strict=True))
    err = (composed - expected).norm() / expected.norm()
    assert err < 1e-5, (err, seeds)


def test_base_only_and_zero_weight_reproduce_the_base(admin_client, client, tiny_base):
    push(admin_client, tiny_base, "z", fresh_seed())
    x = torch.randn(2, 64)
    base_out = logits(predict(client, x))
    torch.testing.assert_close(base_out, tiny_base.net.forward(x), rtol=0, atol=0)
    zero = logits(predict(client, x, components={"z": 0.0}))
    torch.testing.assert_close(zero, base_out, rtol=1e-6, atol=1e-6)


def test_provenance_names_versions_weights_and_generation(admin_client, client, tiny_base):
    a = push(admin_client, tiny_base, "a", fresh_seed(), weight=2.0)
    b = push(admin_client, tiny_base, "b", fresh_seed())
    resp = predict(client, torch.randn(1, 64), components="*", normalize="sum")
    prov = resp["provenance"]
    got = {c["id"]: (c["digest"], c["weight"]) for c in prov["components"]}
    assert got == {"a": (a["digest"], 2 / 3), "b": (b["digest"], 1 / 3)}
    assert prov["generation"] == b["generation"]
    assert len(prov["composition_digest"]) == 64
    assert prov["normalize"] == "sum"


def test_explain_contributions_sum_to_the_composed_output(admin_client, client, tiny_base):
    for i in range(3):
        push(admin_client, tiny_base, f"e{i}", fresh_seed())
    x = torch.randn(2, 64)
    weights = {"e0": 1.0, "e1": 0.5, "e2": -0.25}
    resp = predict(client, x, components=weights, explain=True)
    f0 = logits(predict(client, x))
    for row, out in enumerate(resp["outputs"]):
        total = f0[row] + sum(torch.tensor(v) for v in out["contributions"].values())
        torch.testing.assert_close(torch.tensor(out["logits"]), total, rtol=1e-5, atol=1e-5)
    assert set(resp["outputs"][0]["contributions"]) == set(weights)


def test_concurrent_clients_get_the_same_outputs_as_sequential_requests(
        admin_client, client, tiny_base, server):
    for i in range(4):
        push(admin_client, tiny_base, f"k{i}", fresh_seed())
    rng = random.Random(fresh_seed())
    jobs = []
    for _ in range(48):
        comp = {f"k{i}": rng.choice([0.5, 1.0, -1.0]) for i in rng.sample(range(4), 2)}
        jobs.append((torch.randn(rng.randint(1, 3), 64), comp))
    sequential = [logits(predict(client, x, components=c)) for x, c in jobs]

    def call(job):
        with httpx.Client(base_url=server, timeout=30) as c:
            return logits(predict(c, job[0], components=job[1]))

    with cf.ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(call, jobs))
    for got, want in zip(concurrent, sequential, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    metrics = client.get("/metrics").text
    assert "tmc_batch_size_count" in metrics
