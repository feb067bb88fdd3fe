"""No storage I/O on the device thread (issue 12, point 4): cold component versions are
fetched, verified and decoded at admission on a bounded pool (app/fetch.py), one fetch per
cold version however many requests need it, a slow or failing store fails only the requests
that need it, and tensors fetched before a forget are never used after it.

The store is the real embedded registry (SQLite index + blob files); ``StoreGate`` wraps the
blob store's read (``FileBlobStore.get``) to record which thread reads and, for the versions
it holds, to wait for an event (a slow store) and then fail (a failing store). Every wait
here is on an event or a future, never a sleep.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

import registry as reg
from app.composition import AllActive, Explicit
from app.errors import OverloadedError, status_for
from app.fetch import StagingTooLargeError
from app.host_tensors import decode_tensors
from app.main import create_app
from app.purges import PurgeLog
from app.service import Service
from app.worker import Control, _name
from bases import Base
from registry.file_blobs import FileBlobStore
from tests.app.conftest import (
    component_bytes,
    free_port,
    fresh_seed,
    random_delta,
    settings_for,
    uvicorn_in_thread,
)

DEVICE_THREAD = "tmc-device"


class StoreGate:
    """FileBlobStore.get, instrumented: every read is recorded with its thread's name; a read
    of a ``held`` digest reads the bytes, signals ``entered`` and waits for ``release`` (the
    bytes are on their way), then raises ``fail`` (once) if one is set, else returns them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, str]] = []
        self.held: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None
        real = FileBlobStore.get

        def get(store: FileBlobStore, digest: str) -> bytes | None:
            self.reads.append((digest, threading.current_thread().name))
            data = real(store, digest)
            if digest in self.held:
                self.entered.set()
                assert self.release.wait(60), "the test never released the store"
                error, self.fail = self.fail, None
                if error is not None:
                    raise error
            return data

        monkeypatch.setattr(FileBlobStore, "get", get)

    def reads_of(self, digest: str) -> int:
        return sum(d == digest for d, _ in self.reads)

    def threads(self) -> set[str]:
        return {t for _, t in self.reads}


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreGate]:
    g = StoreGate(monkeypatch)
    yield g
    g.release.set()  # a failed test never leaves a fetch thread waiting


class ControlQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """The device worker's queue, also telling (``controls``) which control commands are put
    on it, once they are in it."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: queue.SimpleQueue[str] = queue.SimpleQueue()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if isinstance(item, Control):
            self.controls.put(_name(item.action))


@contextmanager
def running(base_dir: Path, registry_dir: Path, **settings: Any) -> Iterator[Service]:
    svc = Service.build(settings_for(base_dir, registry_dir, **settings))
    svc.worker._queue = ControlQueue()  # before the device thread starts reading it
    svc.start()
    try:
        yield svc
    finally:
        svc.worker.stop(5.0)
        svc.fetcher.shutdown()
        svc.registry.close()


def add(svc: Service, cid: str, seed: int) -> str:
    return svc.registry.add(cid, component_bytes(svc.base, seed)).digest


def offline(base: Base, x: list[Any], parts: dict[int, float]) -> torch.Tensor:
    """Logits [B, C] of the linearized model under Σ w·Δ(seed), computed here."""
    deltas = [(random_delta(base, seed), w) for seed, w in parts.items()]
    delta = {n: sum(d[n] * w for d, w in deltas) for n in deltas[0][0]} if deltas else None
    return base.net.forward(torch.tensor(x), delta)


def predict(svc: Service, x: list[Any], weights: dict[str, float], explain: bool = False
            ) -> Any:
    return svc.predict(x, Explicit(weights), "none", explain)


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30), "timed out waiting for an event"


def stall(svc: Service) -> threading.Event:
    """Hold the device thread (a control command waiting on the returned event)."""
    hold = threading.Event()
    svc.worker._queue.put(Control(lambda: hold.wait(30)))
    return hold


def signal_after(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set each time obj.name(...) has returned."""
    done = threading.Event()
    real: Callable[..., Any] = getattr(obj, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        done.set()
        return out

    monkeypatch.setattr(obj, name, wrapped)
    return done


def _recorded(method: Callable[..., Any], threads: list[str]) -> Callable[..., Any]:
    def load(self: reg.Registry, digest: str) -> Any:
        threads.append(threading.current_thread().name)
        return method(self, digest)

    return load


# -- the device thread never reads storage ---------------------------------------------------

def test_the_device_thread_never_reads_storage(tiny_base_dir, tiny_base, tmp_path, gate,
                                              monkeypatch):
    """Over real HTTP: cold and warm compositions, "*", a named composition, explain, a forget
    and the re-plan after it. The registry's byte loads (and the blob reads below them) all
    happen on fetch threads; the old code loaded cold components on the device thread."""
    loads: list[str] = []
    for method in ("load_tensors", "load_bytes"):
        monkeypatch.setattr(reg.Registry, method, _recorded(getattr(reg.Registry, method), loads))
    settings = settings_for(tiny_base_dir, tmp_path / "r")
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    admin = {"authorization": "Bearer admin-token-0123456789"}
    x = torch.randn(2, 64).tolist()
    with uvicorn_in_thread(config), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                 timeout=30) as c:
        for cid in ("a", "b", "gone"):
            r = c.put(f"/v1/components/{cid}", content=component_bytes(tiny_base, fresh_seed()),
                      headers=admin)
            assert r.status_code == 201, r.text
        assert c.put("/v1/compositions/ab", json={"weights": {"a": 0.5, "b": 0.5}},
                     headers=admin).status_code in (200, 201)
        bodies = [{"components": {"a": 1.0}}, {"components": {"a": 0.5, "b": 0.5}},
                  {"components": {"a": 0.5, "b": 0.5}}, {"components": "*"},
                  {"composition": "ab"}, {"components": {"b": 1.0, "gone": 1.0},
                                          "explain": True}]
        for body in bodies:
            r = c.post("/v1/predict", json={"inputs": x, **body})
            assert r.status_code == 200, r.text
        assert c.delete("/v1/components/gone", headers=admin).status_code == 200
        r = c.post("/v1/predict", json={"inputs": x, "components": "*"})
        assert r.status_code == 200, r.text
    assert loads and gate.reads, "nothing was loaded: the test proves nothing"
    assert DEVICE_THREAD not in set(loads) | gate.threads(), (loads, gate.reads)
    assert {t.rsplit("_", 1)[0] for t in loads} == {"tmc-fetch"}, loads


def test_a_composition_evicted_before_its_batch_is_staged_again_never_loaded_on_the_device(
        tiny_base_dir, tiny_base, tmp_path, gate, monkeypatch, caplog):
    """Admitted while its composed Δ was cached (so it brought nothing), evicted before its
    batch: the device thread does not go to storage; the request is admitted again with its
    components staged, and answers correctly."""
    seeds = {"a": fresh_seed(), "b": fresh_seed()}
    x = torch.randn(2, 64).tolist()
    with running(tiny_base_dir, tmp_path / "r") as svc:
        for cid, seed in seeds.items():
            add(svc, cid, seed)
        weights = {"a": 0.5, "b": -1.0}
        asyncio.run(predict(svc, x, weights))  # warm: composed Δ cached
        submitted = signal_after(svc.worker, "submit", monkeypatch)
        reads_before = len(gate.reads)

        async def scenario() -> Any:
            hold = stall(svc)
            task = asyncio.create_task(predict(svc, x, weights))
            await wait_for(submitted)  # admitted: nothing to stage, the composition was cached
            assert len(gate.reads) == reads_before
            svc.executor.composed.clear()  # evicted (not purged) before the batch runs
            svc.executor.components.clear()
            hold.set()
            return await task

        with caplog.at_level("INFO", logger="tmc.service"):
            got = asyncio.run(scenario())
    want = offline(tiny_base, x, {seeds["a"]: 0.5, seeds["b"]: -1.0})
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-6)
    assert len(gate.reads) == reads_before + 2  # both components fetched again, off-device
    assert DEVICE_THREAD not in gate.threads()
    assert any(getattr(r, "event", None) == "restage" for r in caplog.records)


# -- single flight -----------------------------------------------------------------------------

def test_concurrent_requests_for_one_cold_version_share_one_fetch(tiny_base_dir, tiny_base,
                                                                  tmp_path, gate, monkeypatch):
    """Six requests (two compositions) need the same cold version while the store is slow: one
    read. When that one read fails, every waiting request gets the failure, and the failure is
    not remembered: the next request fetches again and succeeds."""
    seed = fresh_seed()
    x = torch.randn(1, 64).tolist()
    with running(tiny_base_dir, tmp_path / "r") as svc:
        cold = add(svc, "cold", seed)
        gate.held.add(cold)
        staging = threading.Semaphore(0)
        real_stage = svc.fetcher.stage

        async def counted_stage(digests, epoch):  # signals once the request joined its flight
            task = asyncio.ensure_future(real_stage(digests, epoch))
            await asyncio.sleep(0)  # one loop turn: the task ran up to its first wait
            staging.release()
            return await task

        monkeypatch.setattr(svc.fetcher, "stage", counted_stage)

        async def burst(n: int) -> list[Any]:
            tasks = [asyncio.create_task(predict(svc, x, {"cold": 1.0 if i % 2 else -0.5}))
                     for i in range(n)]
            for _ in range(n):
                assert await asyncio.to_thread(staging.acquire, True, 30)
            gate.release.set()
            return await asyncio.gather(*tasks, return_exceptions=True)

        gate.fail = reg.StorageError("injected: the store answered 500")
        failed = asyncio.run(burst(6))
        assert gate.reads_of(cold) == 1
        assert all(isinstance(r, reg.StorageError) and "injected" in str(r) for r in failed)
        gate.release.clear()
        results = asyncio.run(burst(6))
        assert gate.reads_of(cold) == 2  # the failure was not cached; again one read for six
        shared = svc.metrics.registry.get_sample_value("tmc_component_fetches_total",
                                                       {"kind": "shared"})
        assert shared == 10.0
    for i, got in enumerate(results):
        want = offline(tiny_base, x, {seed: 1.0 if i % 2 else -0.5})
        torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-6)


# -- a slow or failing store fails only its requests --------------------------------------------

def test_a_stuck_store_fails_only_the_requests_that_need_it(tiny_base_dir, tiny_base, tmp_path,
                                                            gate):
    """While the read of a cold version hangs, a warm composition keeps being served (the old
    code held the device thread in that read: these requests timed out); then the cold request
    gets the store's failure as a 503."""
    seeds = {"w1": fresh_seed(), "w2": fresh_seed(), "cold": fresh_seed()}
    x = torch.randn(2, 64).tolist()
    warm = {"w1": 0.5, "w2": 0.5}
    with running(tiny_base_dir, tmp_path / "r", request_timeout_s=10.0) as svc:
        digests = {cid: add(svc, cid, seed) for cid, seed in seeds.items()}
        asyncio.run(predict(svc, x, warm))
        gate.held.add(digests["cold"])
        gate.fail = reg.StorageError("injected: connection reset by the store")

        async def scenario() -> tuple[list[Any], BaseException | None]:
            cold = asyncio.create_task(predict(svc, x, {"cold": 1.0, "w1": 0.5}))
            await wait_for(gate.entered)  # the cold read is stuck in the store
            served = [await predict(svc, x, warm) for _ in range(5)]
            assert not cold.done()
            gate.release.set()
            try:
                await cold
            except reg.StorageError as exc:
                return served, exc
            return served, None

        served, error = asyncio.run(scenario())
    want = offline(tiny_base, x, {seeds["w1"]: 0.5, seeds["w2"]: 0.5})
    for got in served:
        torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-6)
    assert error is not None and "connection reset" in str(error) and status_for(error) == 503


def test_pool_saturation_and_a_fetch_timeout_are_clear_503s(tiny_base_dir, tiny_base, tmp_path,
                                                            gate):
    """One fetch thread, no waiting room, a 1 s fetch timeout, over real HTTP: the request
    whose version hangs in the store gets a 503 naming the version and the store; while that
    fetch still occupies the pool, another cold request is refused at once (503, saturated);
    a warm request is served; once the store answers, the other version is served too."""
    settings = settings_for(tiny_base_dir, tmp_path / "r", fetch_threads=1, fetch_queue_size=0,
                            fetch_timeout_s=1.0)
    svc = Service.build(settings)
    slow, other = add(svc, "slow", fresh_seed()), add(svc, "other", fresh_seed())
    add(svc, "warm", fresh_seed())
    gate.held.add(slow)
    port = free_port()
    config = uvicorn.Config(create_app(settings, svc), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    x = torch.randn(1, 64).tolist()
    with uvicorn_in_thread(config), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                 timeout=30) as c:
        def ask(cid: str) -> httpx.Response:
            return c.post("/v1/predict", json={"inputs": x, "components": {cid: 1.0}})

        assert ask("warm").status_code == 200
        r = ask("slow")
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        error = r.json()["error"]
        assert f"fetching component version {slow}" in error, error
        assert "did not finish within 1 s (TMC_FETCH_TIMEOUT_S, counted from when a fetch " \
            "thread took it)" in error
        assert svc.registry.blob_where in error, error
        assert gate.entered.is_set() and not gate.release.is_set()  # the read still hangs
        r = ask("other")
        assert r.status_code == 503, r.text
        assert ("component fetching is saturated (1 requests waiting for cold versions, the "
                "most allowed: 1 + 0, TMC_FETCH_THREADS + TMC_FETCH_QUEUE_SIZE): this one "
                "needs 1 more version(s)") in r.json()["error"], r.text
        assert ask("warm").status_code == 200
        assert gate.reads_of(other) == 0
        gate.release.set()
        assert ask("slow").status_code == 200  # joins the stuck fetch, or fetches again
        assert ask("other").status_code == 200  # the pool is free again


# -- large compositions, fair turns, the bound on waiting requests, the byte budget ---------------

def test_many_cold_components_are_served_with_the_default_fetch_settings(
        tiny_base_dir, tiny_base, tmp_path, gate):
    """Default TMC_FETCH_* settings (4 threads + 16), real HTTP: "*" over 60 active cold
    components, then an explicit composition of 60 other cold ones: both answered as computed
    here, each version read once, on fetch threads only. The old bound counted versions
    (4 + 16) and refused both with 503, however often they were retried."""
    settings = settings_for(tiny_base_dir, tmp_path / "r")
    assert (settings.fetch_threads, settings.fetch_queue_size) == (4, 16)
    svc = Service.build(settings)
    star = {f"s{i:02d}": fresh_seed() for i in range(60)}
    explicit = {f"e{i:02d}": fresh_seed() for i in range(60)}
    digests = {cid: add(svc, cid, seed) for cid, seed in star.items()}
    for cid, seed in explicit.items():
        digests[cid] = svc.registry.add(cid, component_bytes(tiny_base, seed),
                                        active=False).digest
    weights = {cid: (-1.0) ** i / 30 for i, cid in enumerate(explicit)}
    x = torch.randn(2, 64).tolist()
    with live_app(settings, svc) as c:
        r = c.post("/v1/predict", json={"inputs": x, "components": "*"})
        assert r.status_code == 200, r.text
        got_star = torch.tensor([o["logits"] for o in r.json()["outputs"]])
        r = c.post("/v1/predict", json={"inputs": x, "components": weights})
        assert r.status_code == 200, r.text
        got_explicit = torch.tensor([o["logits"] for o in r.json()["outputs"]])
    want_star = offline(tiny_base, x, {seed: 1.0 for seed in star.values()})
    torch.testing.assert_close(got_star, want_star, rtol=1e-4, atol=1e-4)
    want = offline(tiny_base, x, {explicit[cid]: w for cid, w in weights.items()})
    torch.testing.assert_close(got_explicit, want, rtol=1e-4, atol=1e-4)
    assert sorted(d for d, _ in gate.reads) == sorted(digests.values())  # once each
    assert DEVICE_THREAD not in gate.threads()
    assert {t.rsplit("_", 1)[0] for t in gate.threads()} == {"tmc-fetch"}


@contextmanager
def live_app(settings: Any, svc: Service) -> Iterator[httpx.Client]:
    port = free_port()
    config = uvicorn.Config(create_app(settings, svc), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    with uvicorn_in_thread(config), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                 timeout=60) as c:
        yield c


def test_cold_requests_take_turns_and_too_many_waiting_requests_get_503(
        tiny_base_dir, tiny_base, tmp_path, gate, monkeypatch):
    """One fetch thread, room for two requests with fetches of their own. A composition of 8
    cold versions holds the thread (its first read hangs in the store); a small cold request
    queues behind it; a third request needing a new version is refused (503, saturated), while
    a fourth that only joins the small one's fetch is admitted. Once the store answers, the
    small request's version is read after one more of the big one, before its other 6 (turns,
    not arrival order), and every admitted request is answered as computed here."""
    big = {f"g{i}": fresh_seed() for i in range(8)}
    small, other = fresh_seed(), fresh_seed()
    x = torch.randn(1, 64).tolist()
    with running(tiny_base_dir, tmp_path / "r", fetch_threads=1, fetch_queue_size=1) as svc:
        digests = {cid: add(svc, cid, seed) for cid, seed in big.items()}
        small_digest = add(svc, "small", small)
        add(svc, "other", other)
        gate.held.add(min(digests.values()))  # the big batch's first fetch
        admitted = signal_after(svc.fetcher, "_join_or_start", monkeypatch)

        async def scenario() -> tuple[list[Any], BaseException]:
            first = asyncio.create_task(predict(svc, x, dict.fromkeys(big, 0.25)))
            await wait_for(gate.entered)
            admitted.clear()
            second = asyncio.create_task(predict(svc, x, {"small": 1.0}))
            await wait_for(admitted)
            with pytest.raises(OverloadedError) as refused:
                await predict(svc, x, {"other": 1.0})
            admitted.clear()
            joiner = asyncio.create_task(predict(svc, x, {"small": -1.0}))
            await wait_for(admitted)
            gate.release.set()
            return await asyncio.gather(first, second, joiner), refused.value

        (got_big, got_small, got_joiner), error = asyncio.run(scenario())
    assert status_for(error) == 503
    assert "saturated (2 requests waiting for cold versions, the most allowed: 1 + 1" in \
        str(error)
    order = [d for d, _ in gate.reads]
    firsts = sorted(digests.values())[:2]  # the big batch had its turn before small came
    assert order[:3] == [*firsts, small_digest], order
    assert sorted(order) == sorted([*digests.values(), small_digest])  # one read each
    want = offline(tiny_base, x, dict.fromkeys(big.values(), 0.25))
    torch.testing.assert_close(got_big.logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_small.logits, offline(tiny_base, x, {small: 1.0}),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_joiner.logits, offline(tiny_base, x, {small: -1.0}),
                               rtol=1e-5, atol=1e-6)


def test_a_request_past_the_host_byte_budget_gets_413_and_its_queued_fetches_are_dropped(
        tiny_base_dir, tiny_base, tmp_path, gate):
    """TMC_FETCH_MAX_REQUEST_BYTES of 1.5 components, one fetch thread, a composition of 5
    cold versions: the second one to land passes the budget, the request gets 413 naming the
    setting (while the third read hangs in the store), and the two versions it queued that no
    thread took are never read. A composition within the budget is served."""
    seeds = {f"c{i}": fresh_seed() for i in range(5)}
    one = sum(t.nbytes for t in decode_tensors(component_bytes(tiny_base, 1)).values())
    x = torch.randn(1, 64).tolist()
    with running(tiny_base_dir, tmp_path / "r", fetch_threads=1,
                 fetch_max_request_bytes=one * 3 // 2) as svc:
        order = sorted((add(svc, cid, seed), cid) for cid, seed in seeds.items())
        gate.held.add(order[2][0])

        async def scenario() -> BaseException:
            with pytest.raises(StagingTooLargeError) as refused:
                await predict(svc, x, dict.fromkeys(seeds, 1.0))
            third = svc.fetcher._flights[order[2][0]].future
            assert svc.fetcher.in_flight == 1  # the third, on its thread; 4 and 5 dropped
            gate.release.set()
            await asyncio.wrap_future(third)
            return refused.value

        error = asyncio.run(scenario())
        assert svc.fetcher.in_flight == 0
        got = asyncio.run(predict(svc, x, {order[4][1]: 1.0}))
    assert status_for(error) == 413
    assert f"more than {one * 3 // 2} bytes" in str(error)
    assert "TMC_FETCH_MAX_REQUEST_BYTES" in str(error)
    assert [d for d, _ in gate.reads] == [d for d, _ in order[:3]] + [order[4][0]]
    torch.testing.assert_close(got.logits, offline(tiny_base, x, {seeds[order[4][1]]: 1.0}),
                               rtol=1e-5, atol=1e-6)


# -- forgetting stays exact -------------------------------------------------------------------

@pytest.mark.parametrize("when", ["fetch-lands-after-the-purge",
                                  "queued-before-the-forget"])
def test_tensors_fetched_before_a_forget_are_never_served_after_it(
        tiny_base_dir, tiny_base, tmp_path, gate, monkeypatch, when):
    """A "*" request fetches "victim" before DELETE victim, and its job runs after the purge:
    either its fetch is still on its way during the forget (it lands after the purge), or the
    job already waits in the device queue. Either way it must not use the fetched tensors: it
    is re-planned, without victim, and answers exactly what "keep" alone answers."""
    seeds = {"keep": fresh_seed(), "victim": fresh_seed()}
    x = torch.randn(2, 64).tolist()
    with running(tiny_base_dir, tmp_path / "r", max_queue_delay_ms=1000.0) as svc:
        digests = {cid: add(svc, cid, seed) for cid, seed in seeds.items()}
        if when == "fetch-lands-after-the-purge":
            got = asyncio.run(_forget_while_the_fetch_is_out(svc, gate, digests["victim"], x))
        else:
            got = asyncio.run(_forget_while_the_job_is_queued(svc, x, monkeypatch))
        assert [t.id for t in got.plan.terms] == ["keep"]
        assert svc.executor.components.count_built_from(digests["victim"]) == 0
        assert svc.executor.composed.count_built_from(digests["victim"]) == 0
    want = offline(tiny_base, x, {seeds["keep"]: 1.0})
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-6)


async def _forget_while_the_fetch_is_out(svc: Service, gate: StoreGate, victim: str,
                                         x: list[Any]) -> Any:
    gate.held.add(victim)  # the read of victim is stuck until the forget's receipt is back
    task = asyncio.create_task(svc.predict(x, AllActive(), "none", False))
    await wait_for(gate.entered)
    receipt = await asyncio.to_thread(svc.forget, "victim")  # purges the device caches
    assert receipt.digests_removed == [victim]
    gate.release.set()  # the bytes read before the forget now reach the request
    return await task


async def _forget_while_the_job_is_queued(svc: Service, x: list[Any],
                                          monkeypatch: pytest.MonkeyPatch) -> Any:
    submitted = signal_after(svc.worker, "submit", monkeypatch)
    controls = svc.worker._queue.controls
    hold = stall(svc)
    task = asyncio.create_task(svc.predict(x, AllActive(), "none", False))
    await wait_for(submitted)  # fetched, staged, queued behind the stalled device
    forget = asyncio.create_task(asyncio.to_thread(svc.forget, "victim"))
    await asyncio.to_thread(_until_queued, controls, "Executor.purge")  # behind the job
    hold.set()  # the batcher takes the job, then the purge, then runs the batch
    receipt = await forget
    assert len(receipt.digests_removed) == 1
    return await task


def _until_queued(controls: queue.SimpleQueue[str], name: str) -> None:
    while (got := controls.get(timeout=30)) != name:
        assert got != "Executor.purge", f"a purge queued before {name}"


# -- the purge log ------------------------------------------------------------------------------

def test_purge_log_refuses_what_predates_a_purge_and_serves_a_version_added_again():
    log = PurgeLog(keep=2)
    before = log.epoch
    log.record(["d1"])
    assert log.forgotten_since({"d1", "d2"}, before) == ["d1"]
    after = log.epoch  # a request admitted after the forget (d1 added again, same digest)
    assert log.forgotten_since({"d1"}, after) == []
    log.record(["d2"])
    log.record(["d3"])  # d1's tombstone is dropped (keep=2): what predates it is refused
    assert log.forgotten_since({"d9"}, before) == ["d9"]
    assert log.forgotten_since({"d9"}, after) == []  # newer than the dropped tombstone
    assert log.forgotten_since(set(), before) == []


# -- decoding -----------------------------------------------------------------------------------

def test_decode_tensors_matches_safetensors_and_gives_tensors_of_their_own(tiny_base):
    """Components as the registry stores them, and every dtype decode_tensors copies itself
    (0-d and empty tensors too): the same tensors as safetensors.torch.load, writable and not
    sharing memory with the bytes; a dtype it does not copy goes through the library."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    g = torch.Generator().manual_seed(fresh_seed())
    odd = {"f16": torch.randn(3, 5, generator=g).half(),
           "bf16": torch.randn(7, generator=g).bfloat16(),
           "f64": torch.randn(2, 2, generator=g).double(), "i64": torch.arange(-3, 9),
           "i32": torch.arange(4, dtype=torch.int32), "i16": torch.arange(5, dtype=torch.int16),
           "i8": torch.arange(-2, 2, dtype=torch.int8), "u8": torch.arange(6, dtype=torch.uint8),
           "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
           "empty": torch.zeros(0, 4)}
    files = [component_bytes(tiny_base, fresh_seed()), st_save(odd, {"k": "v"}),
             st_save({"f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
                      "f32": torch.randn(3, generator=g)})]
    for data in files:
        want, got = st_load(data), decode_tensors(data)
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
            assert torch.equal(_bytes_of(got[name]), _bytes_of(tensor)), name  # bit for bit
    decoded = decode_tensors(files[0])
    first = next(iter(decoded.values()))
    first.add_(1.0)  # its own writable memory: the bytes are untouched
    assert torch.equal(decode_tensors(files[0])[next(iter(decoded))] + 1.0, first)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)
