"""Redis SIGKILLed and restarted under load (issue 14, item 1).

Each test runs its own redis-server on a free loopback port, serves a Redis-backed replica
in-process (uvicorn), keeps a few client threads predicting with ``"*"``, SIGKILLs Redis in
the middle, and restarts it on the same port: with AOF (``appendfsync always``) the replica
recovers by itself with the same components; without persistence it reports the registry
lost. Every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from loopback.ports import free_port
from loopback.process import MissingBinary, stop_process
from loopback.redis_server import redis_binary, wait_for_ping
from tests.app.conftest import ADMIN, component_bytes, fresh_seed, live_server, settings_for

pytestmark = [pytest.mark.redis]
AUTH = {"authorization": f"Bearer {ADMIN}"}
X = torch.randn(2, 64).tolist()
REQUEST_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 20.0  # an httpx timeout here is a hang: a failure
THREADS = 3
MAX_REQUESTS_PER_THREAD = 3000
WAIT_S = 30.0


class KillableRedis:
    """One redis-server on one fixed port; ``persistent``: AOF fsynced on every write."""

    def __init__(self, workdir: Path, persistent: bool) -> None:
        try:
            self.binary = redis_binary()
        except MissingBinary as exc:
            pytest.fail(str(exc), pytrace=False)  # says how to install it
        self.workdir, self.persistent = workdir, persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                *persistence, "--dir", str(self.workdir), "--daemonize", "no"]
        with open(self.workdir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        if not wait_for_ping(self.url, self.proc):
            log = (self.workdir / "redis.log").read_text()[-2000:]
            pytest.fail(f"redis-server did not start on {self.port}:\n{log}", pytrace=False)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)


@dataclass
class Outcome:
    phase_start: str
    phase_end: str
    status: int | None  # None: the client got no answer (an exception)
    error: str


@dataclass
class Load:
    """THREADS clients predicting "*" until stopped (or MAX_REQUESTS_PER_THREAD each)."""

    url: str
    phase: str = "before"
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[list[Outcome]] = field(default_factory=lambda: [[] for _ in range(THREADS)])
    threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, mine: list[Outcome]) -> None:
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT_S) as c:
            for _ in range(MAX_REQUESTS_PER_THREAD):
                if self.stop.is_set():
                    return
                start = self.phase
                try:
                    r = c.post("/v1/predict", json={"inputs": X, "components": "*"})
                    status, error = r.status_code, ("" if r.is_success else r.text)
                except httpx.HTTPError as exc:
                    status, error = None, f"{type(exc).__name__}: {exc}"
                mine.append(Outcome(start, self.phase, status, error))
                time.sleep(0.01)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, args=(m,), daemon=True)
                        for m in self.results]
        for t in self.threads:
            t.start()

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"
        return [o for mine in self.results for o in mine]

    def wait_each(self, pred: Callable[[list[Outcome]], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not all(pred(list(m)) for m in self.results):
            assert all(t.is_alive() for t in self.threads), "a client thread ended early"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)


def in_phase(outcomes: list[Outcome], phase: str) -> list[Outcome]:
    return [o for o in outcomes if o.phase_start == o.phase_end == phase]


def count(phase: str, status: int, n: int) -> Callable[[list[Outcome]], bool]:
    return lambda mine: sum(o.status == status for o in in_phase(mine, phase)) >= n


def last_ok(phase: str, n: int) -> Callable[[list[Outcome]], bool]:
    def pred(mine: list[Outcome]) -> bool:
        tail = in_phase(mine, phase)[-n:]
        return len(tail) == n and all(o.status == 200 for o in tail)
    return pred


def wait_readyz(c: httpx.Client, status: int) -> httpx.Response:
    deadline = time.monotonic() + WAIT_S
    while True:
        r = c.get("/readyz")
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def served_components(c: httpx.Client) -> list[tuple[str, str]]:
    r = c.post("/v1/predict", json={"inputs": X, "components": "*"})
    assert r.status_code == 200, r.text
    return [(t["id"], t["digest"]) for t in r.json()["provenance"]["components"]]


@pytest.fixture
def killable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KillableRedis]:
    (tmp_path / "redis").mkdir()
    server = KillableRedis(tmp_path / "redis", request.param)
    try:
        yield server
    finally:
        server.stop()


def common_outage_checks(outcomes: list[Outcome]) -> None:
    assert outcomes, "no request ran"
    no_answer = [o for o in outcomes if o.status is None]
    assert not no_answer, f"requests got no answer (hang or dropped): {no_answer[:3]}"
    assert not [o for o in outcomes if o.status == 500], "a 500 under the Redis fault"
    before = in_phase(outcomes, "before")
    assert before and all(o.status == 200 for o in before), before[:3]
    outage = in_phase(outcomes, "outage")
    assert outage and all(o.status == 503 for o in outage), [
        (o.status, o.error) for o in outage if o.status != 503][:3]
    assert all("Redis registry unavailable" in o.error for o in outage), outage[0].error
    unexpected = {o.status for o in outcomes} - {200, 503}
    assert not unexpected, [o for o in outcomes if o.status in unexpected][:3]


def kill_under_load(redis_server: KillableRedis, c: httpx.Client, load: Load) -> None:
    load.wait_each(count("before", 200, 3), "3 answers before the kill")
    load.phase = "killing"  # a request in flight across the kill may go either way
    redis_server.kill()
    load.phase = "outage"
    r = wait_readyz(c, 503)
    assert r.status_code == 503, r.text
    assert not r.json()["ready"] and not r.json()["registry"], r.text
    assert "Redis registry unavailable" in r.json()["registry_error"], r.text
    load.wait_each(count("outage", 503, 3), "3 refusals during the outage")
    r = c.get("/readyz")
    assert r.status_code == 503 and "Redis registry unavailable" in r.json()["registry_error"]


def redis_settings(killable, tiny_base_dir, tmp_path):
    return settings_for(tiny_base_dir, tmp_path / "unused", redis_url=killable.url,
                        blob_cache_dir=tmp_path / "cache", request_timeout_s=REQUEST_TIMEOUT_S)


def push_a_and_b(c, tiny_base):
    for cid in ("a", "b"):
        r = c.put(f"/v1/components/{cid}", content=component_bytes(tiny_base, fresh_seed()),
                  headers=AUTH)
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("killable", [True], indirect=True, ids=["aof"])
def test_redis_sigkilled_under_load_with_persistence_recovers_by_itself(
        killable, tiny_base_dir, tiny_base, tmp_path):
    settings = redis_settings(killable, tiny_base_dir, tmp_path)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as c:
        push_a_and_b(c, tiny_base)
        before = served_components(c)
        assert [cid for cid, _ in before] == ["a", "b"]
        load = Load(url)
        load.start()
        try:
            kill_under_load(killable, c, load)
            load.phase = "restarting"  # neither outage nor after: Redis comes up meanwhile
            killable.start()  # same port, same dir: the AOF is replayed
            load.phase = "after"
            r = wait_readyz(c, 200)  # no restart of the replica, no operator action
            assert r.status_code == 200 and r.json()["ready"], r.text
            assert r.json()["registry_generation"] == 2, r.text
            load.wait_each(last_ok("after", 3), "3 answers in a row after the restart")
        finally:
            outcomes = load.finish()
        assert served_components(c) == before
        assert c.post("/v1/predict", json={"inputs": X, "components": {"a": 1.0}}
                      ).status_code == 200
    common_outage_checks(outcomes)


@pytest.mark.parametrize("killable", [False], indirect=True, ids=["no-persistence"])
def test_redis_sigkilled_under_load_without_persistence_reports_the_registry_lost(
        killable, tiny_base_dir, tiny_base, tmp_path):
    settings = redis_settings(killable, tiny_base_dir, tmp_path)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as c:
        push_a_and_b(c, tiny_base)
        assert [cid for cid, _ in served_components(c)] == ["a", "b"]
        load = Load(url)
        load.start()
        try:
            kill_under_load(killable, c, load)
            load.phase = "restarting"
            killable.start()  # same port, empty
            load.phase = "after"
            deadline = time.monotonic() + WAIT_S
            while True:  # past the reconnect: "unavailable" turns into "lost its data"
                r = c.get("/readyz")
                if "lost its data" in r.json().get("registry_error", ""):
                    break
                assert time.monotonic() < deadline, r.text
                time.sleep(0.05)
            assert r.status_code == 503 and not r.json()["ready"], r.text
            assert "generation 0 after 2; base key missing" in r.json()["registry_error"]
            load.wait_each(count("after", 503, 3), "3 refusals after the restart")
        finally:
            outcomes = load.finish()
        for spec in ("*", {"a": 1.0}):
            r = c.post("/v1/predict", json={"inputs": X, "components": spec})
            assert r.status_code == 503, r.text
            assert "the shared registry lost its data" in r.json()["error"], r.text
        assert c.post("/v1/predict", json={"inputs": X}).status_code == 200  # base alone
    common_outage_checks(outcomes)
    after = in_phase(outcomes, "after")
    assert after and all(o.status == 503 for o in after), [o.status for o in after]
    lost = [o for o in after if "lost its data" in o.error]
    assert lost and all("lost its data" in o.error for o in after[-3:]), after[-3:]
