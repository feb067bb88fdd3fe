"""Forgetting is exact in memory too: once DELETE's receipt is back, no object in the process
holds a forgotten component version's tensors: not the device caches, not the job that
brought them (the device thread's last batch), not the fetch pool's single-flight futures,
not the traceback of an error a request got (a group that failed on the device, or a job
whose cached Δ was evicted before it ran and that was admitted again).

Every tensor decoded for a component (``Fetcher.load``, wrapped here) and every tensor of a
composed Δ built from them is tracked by a weakref; after the forgets (and the fetch threads
joined, so no thread is still returning from a fetch) each weakref must be dead. The cyclic
garbage collector is off while a scenario runs: the tensors must be released by reference
counting when the last holder lets go, not whenever the collector next visits its oldest
generation. In bench/memory.py the holders this test found kept ~220-280 MiB after
forgetting 50 components (the device loop's last batch; a flight <-> future <-> done-callback
cycle)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import app.executor as executor_module
from app.composition import Explicit
from app.executor import Executor
from app.host_tensors import HostTensors, LoadTensors
from app.plan import Plan
from app.service import Service
from tests.app.conftest import fresh_seed
from tests.app.test_fetch import (
    _forget_while_the_job_is_queued,
    add,
    running,
    signal_after,
    stall,
    wait_for,
)

IDS = ("keep", "victim", "third")


class Tracked:
    """Weakrefs to the tensors of component versions and composed Δ's, by what they are."""

    def __init__(self) -> None:
        self.refs: list[tuple[str, weakref.ref[torch.Tensor]]] = []

    def loader(self, load: LoadTensors) -> LoadTensors:
        """``load``, recording a weakref to every tensor it decodes."""
        def tracking(digest: str) -> HostTensors:
            tensors = load(digest)
            self.refs += [(f"version {digest[:12]} {name}", weakref.ref(t))
                          for name, t in tensors.items()]
            return tensors

        return tracking

    def composed(self, executor: Executor, plan: Plan) -> None:
        delta = executor.composed.get(plan.composition_digest)
        assert delta is not None, "the composition's Δ was not cached"
        self.refs += [(f"composed Δ {plan.composition_digest[:12]} {name}", weakref.ref(t))
                      for name, t in delta.items()]

    def alive(self) -> list[str]:
        """What is still alive, each with a chain of the objects that hold it."""
        found = []
        for what, ref in self.refs:
            tensor = ref()
            if tensor is not None:
                found.append(f"{what}: held by {' <- '.join(_holders(tensor))}")
            del tensor
        return found


def _holders(obj: object, depth: int = 10) -> list[str]:
    """The types of a chain of objects holding ``obj`` (the first referrer at each step)."""
    chain: list[str] = []
    made: list[list[object]] = []  # the referrer lists made here hold the chain too
    for _ in range(depth):
        found = gc.get_referrers(obj)
        holder = next((r for r in found if not any(r is m for m in made)), None)
        made.append(found)
        if holder is None:
            break
        code = getattr(holder, "f_code", None)  # a frame: name its function
        chain.append(type(holder).__name__ + (f" {code.co_name}" if code else ""))
        obj = holder
    return chain


@contextmanager
def cyclic_gc_off() -> Iterator[None]:
    gc.collect()  # what earlier tests left behind is not counted
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _composed(svc: Service, x: list[Any], explain: bool) -> Plan:
    got = await svc.predict(x, Explicit({cid: 1.0 for cid in IDS}), "none", explain)
    return got.plan


async def _replanned(svc: Service, x: list[Any], monkeypatch: pytest.MonkeyPatch) -> Plan:
    """A "*" request fetches every version and queues its job; "victim" is forgotten before
    it runs, so it is re-planned without victim (tests/app/test_fetch.py)."""
    got = await _forget_while_the_job_is_queued(svc, x, monkeypatch)
    plan: Plan = got.plan
    assert "victim" not in [t.id for t in plan.terms]
    return plan


async def _restaged(svc: Service, x: list[Any], monkeypatch: pytest.MonkeyPatch) -> Plan:
    """"keep" is cached, so the request stages the other two; the component cache is evicted
    before its batch runs: the job fails with NotStagedError on the device thread (holding
    what it brought) and the request is admitted again with everything staged."""
    await svc.predict(x, Explicit({"keep": 1.0}), "none", False)
    submitted = signal_after(svc.worker, "submit", monkeypatch)
    hold = stall(svc)
    task = asyncio.create_task(_composed(svc, x, explain=False))
    await wait_for(submitted)
    svc.executor.components.clear()  # evicted (not purged) before the batch runs
    hold.set()
    return await task


async def _failed(svc: Service, x: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving a staged component to the device fails (as a device out of memory would): the
    request gets the error, whose traceback has the frame that held the host tensors."""
    def out_of_memory(delta: HostTensors, device: torch.device, dtype: torch.dtype) -> Any:
        raise RuntimeError("the device is out of memory (test)")

    monkeypatch.setattr(executor_module, "cast_delta", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        await _composed(svc, x, explain=False)


async def _scenario(name: str, svc: Service, x: list[Any],
                    monkeypatch: pytest.MonkeyPatch) -> Plan | None:
    """Runs one scenario; the plan whose composed Δ was cached (None when none was)."""
    if name == "forgotten-while-queued":
        return await _replanned(svc, x, monkeypatch)
    if name == "evicted-before-its-batch":
        return await _restaged(svc, x, monkeypatch)
    if name == "device-out-of-memory":
        await _failed(svc, x, monkeypatch)
        return None
    return await _composed(svc, x, explain=name == "explained")


@pytest.mark.parametrize("scenario", ["composed", "explained", "forgotten-while-queued",
                                      "evicted-before-its-batch", "device-out-of-memory"])
def test_forgotten_versions_tensors_are_released_when_the_forgets_return(
        tiny_base_dir, tmp_path, monkeypatch, scenario):
    x = torch.randn(2, 64).tolist()
    tracked = Tracked()
    with running(tiny_base_dir, tmp_path / "r", max_queue_delay_ms=1000.0) as svc:
        svc.fetcher.load = tracked.loader(svc.fetcher.load)
        for cid in IDS:
            add(svc, cid, fresh_seed())
        with cyclic_gc_off():
            plan = asyncio.run(_scenario(scenario, svc, x, monkeypatch))
            if plan is not None:
                tracked.composed(svc.executor, plan)
            for info in svc.registry.list():  # victim is gone already when re-planned
                svc.forget(info.id)
            assert svc.executor.cached_bytes == 0
            svc.fetcher.shutdown(wait=True)
            assert len(tracked.refs) > len(IDS)  # every version was decoded
            alive = tracked.alive()
        assert alive == [], "forgotten tensors still reachable:\n" + "\n".join(alive)
