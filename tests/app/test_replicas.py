"""Two service processes sharing one real Redis: a forget on A is exact on B at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.app.conftest import ADMIN, component_bytes, free_port, fresh_seed

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def start_replica(base_dir: Path, redis_url: str, cache_dir: Path) -> tuple[subprocess.Popen,
                                                                            str]:
    port = free_port()
    env = {**os.environ, "TMC_BASE_DIR": str(base_dir), "TMC_REDIS_URL": redis_url,
           "TMC_ADMIN_TOKEN": ADMIN, "TMC_DEVICE": "cpu", "TMC_BLOB_CACHE_DIR": str(cache_dir),
           "TMC_LOG_LEVEL": "warning", "TMC_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"replica at {url} not ready in time")


@pytest.fixture
def replicas(tiny_base_dir, redis_server, tmp_path):
    procs = [start_replica(tiny_base_dir, redis_server, tmp_path / f"cache{i}") for i in range(2)]
    try:
        for proc, url in procs:
            wait_ready(url, proc)
        yield [url for _, url in procs], [tmp_path / "cache0", tmp_path / "cache1"]
    finally:
        for proc, _ in procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def wait_for(condition, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_forget_on_a_is_seen_by_every_request_admitted_later_on_b(replicas, tiny_base):
    (url_a, url_b), (_, cache_b) = replicas
    auth = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url_a, headers=auth, timeout=30) as a:
        for cid in ("keep1", "keep2", "victim"):
            r = a.put(f"/v1/components/{cid}", content=component_bytes(tiny_base, fresh_seed()))
            assert r.status_code == 201, r.text
    x = torch.randn(2, 64).tolist()
    with httpx.Client(base_url=url_b, timeout=30) as b:
        r = b.post("/v1/predict", json={"inputs": x, "components": "*"})
        assert {c["id"] for c in r.json()["provenance"]["components"]} == {
            "keep1", "keep2", "victim"}
        victim_digest = next(c["digest"] for c in r.json()["provenance"]["components"]
                             if c["id"] == "victim")

    records: list[tuple[float, dict]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=url_b, timeout=30) as b:
            while not stop.is_set():
                sent = time.monotonic()
                resp = b.post("/v1/predict", json={"inputs": x, "components": "*"})
                assert resp.status_code == 200, resp.text
                records.append((sent, resp.json()))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    # at least 5 answers sent well before the DELETE (it counts "earlier" as sent 0.1 s
    # before the receipt): waiting for a count alone raced a fast hammer (seen: 4 of 12)
    wait_for(lambda: len(records) >= 12
             and sum(sent < time.monotonic() - 0.2 for sent, _ in records) >= 5)
    with httpx.Client(base_url=url_a, headers=auth, timeout=30) as a:
        receipt = a.delete("/v1/components/victim").json()
    forgot_at = time.monotonic()
    wait_for(lambda: sum(sent > forgot_at for sent, _ in records) >= 12)
    stop.set()
    for t in threads:
        t.join(30)

    assert receipt["digests_removed"] == [victim_digest]
    later = [body for sent, body in records if sent > forgot_at]
    earlier = [body for sent, body in records if sent < forgot_at - 0.1]
    assert len(later) >= 12 and len(earlier) >= 5, (len(later), len(earlier))
    with httpx.Client(base_url=url_b, timeout=30) as b:
        never_had_it = b.post("/v1/predict", json={
            "inputs": x, "components": {"keep1": 1.0, "keep2": 1.0}}).json()
    for body in later:
        ids = [c["id"] for c in body["provenance"]["components"]]
        assert ids == ["keep1", "keep2"], ids
        assert body["provenance"]["generation"] >= receipt["generation"]
        torch.testing.assert_close(  # batch-mates may change BLAS blocking: float tolerance
            torch.tensor([o["logits"] for o in body["outputs"]]),
            torch.tensor([o["logits"] for o in never_had_it["outputs"]]), rtol=1e-5, atol=1e-6)
    assert any("victim" in [c["id"] for c in b["provenance"]["components"]] for b in earlier)
    leftovers = [p for p in cache_b.rglob("*") if victim_digest in p.name]
    assert leftovers == [], leftovers
