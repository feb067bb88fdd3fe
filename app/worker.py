"""The device worker: one thread owns the device; the event loop never runs torch.

Loop: collect jobs (up to max batch items or max queue delay) -> group by composition
-> one trunk pass for the batch, one tangent tail per group -> resolve each job's future.
A failing group fails alone.
Control commands (purge on forget) run on the same thread, between groups, so no
cache insert can race a purge.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app.errors import OverloadedError
from app.executor import Executor, select_rows
from app.metrics import Metrics
from app.plan import Plan

log = logging.getLogger("tmc.worker")


@dataclass
class Job:
    items: list[Any]  # preprocessed inputs of one request
    plan: Plan
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    admitted: float = field(default_factory=time.perf_counter)


@dataclass
class Control:
    action: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class DeviceWorker:
    def __init__(self, executor: Executor, collate: Callable[[Sequence[Any]], Any],
                 metrics: Metrics, max_batch: int, max_delay_s: float, max_queue: int) -> None:
        self.executor, self.collate, self.metrics = executor, collate, metrics
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0  # jobs admitted and not yet taken by the worker
        self._incoming = 0  # requests being decoded/resolved: jobs that will arrive soon
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tmc-device", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    def expect(self) -> None:
        """A request started decoding: the batcher may wait for it."""
        with self._lock:
            self._incoming += 1

    def unexpect(self) -> None:
        with self._lock:
            self._incoming -= 1

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending >= self.max_queue:
                raise OverloadedError(f"queue is full ({self.max_queue} requests waiting); "
                                      "retry after a short delay")
            self._pending += 1
        self.metrics.queue_depth.set(self._pending)
        self._queue.put(job)

    def call(self, action: Callable[[], None], timeout: float = 30.0) -> None:
        """Run action on the device thread, between groups; wait for it.

        Called on the device thread itself — a registry forget hook fires while a group
        loads a component that was just forgotten — it runs at once: queueing it there
        would wait for this very thread (the whole device stalled for ``timeout``).
        """
        control = Control(action)
        if threading.current_thread() is self._thread:
            self._run_control(control)
            return
        self._queue.put(control)
        control.done.wait(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            live = [j for j in batch if not j.future.done()]  # timed-out requests are skipped
            groups: dict[str, list[Job]] = {}
            for job in live:
                groups.setdefault(job.plan.group_key, []).append(job)
            if groups:
                self.metrics.observe_batch(sum(len(j.items) for j in live), len(groups))
                self._run_batch(list(groups.values()))

    def _collect(self) -> list[Job] | None:
        batch: list[Job] = []
        items, deadline = 0, None
        while items < self.max_batch:
            timeout = None if deadline is None else deadline - time.perf_counter()
            if timeout is not None and (timeout <= 0 or self._nothing_coming()):
                break
            try:
                got = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if got is _STOP:
                return batch if batch else None
            if isinstance(got, Control):
                self._run_control(got)
                continue
            self._take(got)
            batch.append(got)
            items += len(got.items)
            deadline = deadline or time.perf_counter() + self.max_delay_s
        return batch

    def _nothing_coming(self) -> bool:
        """No job queued and no request on its way: waiting would only add latency."""
        return self._incoming == 0 and self._queue.empty()

    def _take(self, job: Job) -> None:
        with self._lock:
            self._pending -= 1
        self.metrics.queue_depth.set(self._pending)
        self.metrics.queue_seconds.observe(time.perf_counter() - job.admitted)

    def _run_control(self, control: Control) -> None:
        try:
            control.action()
        except Exception:  # a failed purge must not kill the device thread
            log.exception("control action failed")
        finally:
            control.done.set()

    def _run_batch(self, groups: list[list[Job]]) -> None:
        """One trunk pass for the whole batch, then one tail per composition group."""
        started = time.perf_counter()
        try:
            h = self.executor.trunk(self.collate([i for g in groups for j in g for i in j.items]))
        except Exception:  # isolate the culprit: each group runs on its own
            log.warning("batch trunk failed; retrying group by group", exc_info=True)
            for jobs in groups:
                self._run_group(jobs, None)
            return
        self.metrics.trunk_seconds.observe(time.perf_counter() - started)
        start = 0
        for jobs in groups:
            rows = sum(len(j.items) for j in jobs)
            self._run_group(jobs, select_rows(h, slice(start, start + rows)))
            start += rows

    def _run_group(self, jobs: list[Job], h: object | None) -> None:
        """Tail (or, with h None, the whole network) for one composition; fails alone."""
        plan = jobs[0].plan
        started = time.perf_counter()
        try:
            if h is None:
                h = self.executor.trunk(self.collate([i for j in jobs for i in j.items]))
            if plan.explain:
                logits, contrib = self.executor.explain_tail(plan, h)
            else:
                logits, contrib = self.executor.tail(plan, h), None
        except Exception as exc:  # this group fails alone
            log.warning("group %s failed: %s", plan.group_key[:12], exc)
            for j in jobs:
                _resolve(j, error=exc)
            return
        kind = "plain" if not plan.terms else ("explain" if plan.explain else "linearized")
        self.metrics.forward_seconds.labels(kind=kind).observe(time.perf_counter() - started)
        start = 0
        for j in jobs:
            end = start + len(j.items)
            part = None if contrib is None else contrib[:, start:end]
            _resolve(j, result=(logits[start:end], part))
            start = end


def _resolve(job: Job, result: tuple[torch.Tensor, torch.Tensor | None] | None = None,
             error: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(settle)
