"""The device worker in isolation: batching, grouping, isolation, bounded queue."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from app.composition import make_plan
from app.errors import OverloadedError
from app.executor import Executor
from app.metrics import Metrics
from app.worker import DeviceWorker, Job
from registry.types import ResolvedItem
from tests.app.conftest import fresh_seed, random_delta


def make_worker(base, tensors, max_queue=64):
    def load(digest):
        if digest not in tensors:
            raise KeyError(f"unknown digest {digest}")
        return tensors[digest]

    ex = Executor(base.net, load, torch.device("cpu"), torch.float32, 1 << 24)
    return DeviceWorker(ex, base.preprocessor.collate, Metrics(), 64, 0.005, max_queue)


def plan_for(pairs):
    return make_plan([ResolvedItem(d, d, w) for d, w in pairs], 1, "none", False)


async def run_jobs(worker, jobs, hold: threading.Event):
    loop = asyncio.get_running_loop()
    futures = []
    for items, plan in jobs:
        fut = loop.create_future()
        worker.submit(Job(items, plan, fut, loop))
        futures.append(fut)
    hold.set()
    return await asyncio.gather(*futures, return_exceptions=True)


def test_one_batch_many_groups_and_a_bad_group_fails_alone(tiny_base):
    tensors = {f"d{i}": random_delta(tiny_base, fresh_seed()) for i in range(3)}
    worker = make_worker(tiny_base, tensors)
    trunk_calls = []
    real_trunk = worker.executor.trunk
    worker.executor.trunk = lambda x: trunk_calls.append(x) or real_trunk(x)
    worker.start()
    hold = threading.Event()
    worker._queue.put(_stall(hold))  # the worker waits while we queue everything
    xs = [torch.randn(64) for _ in range(6)]
    plans = [plan_for([("d0", 1.0)]), plan_for([("d1", 0.5), ("d2", 0.5)]),
             plan_for([("missing", 1.0)])]
    jobs = [([xs[i]], plans[i % 3]) for i in range(6)]
    results = asyncio.run(run_jobs(worker, jobs, hold))
    worker.stop(5)
    assert all(isinstance(r, KeyError) for r in results[2::3])
    for i in (0, 1, 3, 4):
        logits, _ = results[i]
        plan = plans[i % 3]
        delta = worker.executor.composed_delta(plan)
        want = tiny_base.net.forward(xs[i][None], delta)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    groups = worker.metrics.batch_groups.collect()[0].samples
    count = next(s.value for s in groups if s.name.endswith("_count"))
    total = next(s.value for s in groups if s.name.endswith("_sum"))
    assert (count, total) == (1.0, 3.0)  # six jobs, one batch, three groups
    assert len(trunk_calls) == 1 and trunk_calls[0].shape == (6, 64)  # one shared trunk pass


def _stall(hold: threading.Event):
    from app.worker import Control

    return Control(lambda: hold.wait(10))


def test_queue_is_bounded(tiny_base):
    worker = make_worker(tiny_base, {}, max_queue=2)
    loop = asyncio.new_event_loop()
    try:
        plan = plan_for([])
        for _ in range(2):
            worker.submit(Job([torch.zeros(64)], plan, loop.create_future(), loop))
        with pytest.raises(OverloadedError, match="queue is full"):
            worker.submit(Job([torch.zeros(64)], plan, loop.create_future(), loop))
    finally:
        loop.close()


def test_purge_drops_component_and_composed_entries(tiny_base):
    tensors = {"d0": random_delta(tiny_base, 1), "d1": random_delta(tiny_base, 2)}
    worker = make_worker(tiny_base, tensors)
    ex = worker.executor
    p01, p1 = plan_for([("d0", 1.0), ("d1", 1.0)]), plan_for([("d1", 2.0)])
    ex.composed_delta(p01)
    ex.composed_delta(p1)
    assert len(ex.composed) == 2 and len(ex.components) == 2
    ex.purge(["d0"])
    assert p01.composition_digest not in ex.composed and p1.composition_digest in ex.composed
    assert "d0" not in ex.components and "d1" in ex.components


def test_a_forget_hook_firing_on_the_device_thread_does_not_stall_it(tiny_base):
    """The registry fires its purge hook on whichever thread finds a version forgotten —
    the device thread itself when it loads a component forgotten since the plan was made.
    The hook's worker.call must then run at once, not wait for its own thread."""
    import time

    tensors = {"kept": random_delta(tiny_base, fresh_seed())}
    purged: list[list[str]] = []

    def load(digest):
        if digest == "gone":  # as the registry does: purge hook, then NotFound
            worker.call(lambda: purged.append(["gone"]), timeout=20.0)
            raise LookupError("no component version gone")
        return tensors[digest]

    ex = Executor(tiny_base.net, load, torch.device("cpu"), torch.float32, 1 << 24)
    worker = DeviceWorker(ex, tiny_base.preprocessor.collate, Metrics(), 64, 0.005, 64)
    worker.start()
    x = [torch.randn(64)]
    started = time.monotonic()
    results = asyncio.run(run_jobs(worker, [(x, plan_for([("gone", 1.0)])),
                                            (x, plan_for([("kept", 1.0)]))], threading.Event()))
    elapsed = time.monotonic() - started
    worker.stop(5)
    assert isinstance(results[0], LookupError) and purged == [["gone"]]
    assert not isinstance(results[1], BaseException)
    assert elapsed < 10.0, f"device thread stalled {elapsed:.1f} s on its own call"
