"""The device worker: one thread owns the device; the event loop never runs torch.

Loop: collect jobs (up to max batch items or max queue delay) -> group by composition
-> one trunk pass for the batch, one tangent tail per group -> one wait for the device
(each group's results copied back to pinned host memory without blocking, before it) ->
resolve each job's future. A group that fails to launch fails alone; an asynchronous
device error, seen only at the wait, fails the batch.
Control commands (purge on forget) run on the same thread, between batches, so no
cache insert can race a purge; the caller gets the command's result or its exception (the
thread logs it and keeps serving). Just before a batch runs, a job one of whose component
versions was purged since it was admitted fails with NotFoundError (the service re-plans
it): it never uses tensors it brought from before the purge (app/purges.py). The device
thread reads no storage: components it lacks come with the job, staged at admission.
Once its batch has run, a job lets go of the host tensors it brought, and nothing on this
thread keeps them (no batch between batches, no locals in the traceback of an error a
request gets), so what a forget purges leaves the process then
(tests/app/test_forget_releases_tensors.py).
A stop ends the loop after the batch being collected has run; whatever is still queued
then is refused, and so is any later job or command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeAlias, TypeVar, cast

import torch

from app.errors import DeviceTimeoutError, NotReadyError, OverloadedError
from app.executor import Executor, select_rows
from app.fetch import Staged
from app.host_tensors import HostTensors
from app.logs import current_request_id
from app.metrics import Metrics
from app.plan import Plan
from bases import ModelInput
from registry.errors import NotFoundError

log = logging.getLogger("tmc.worker")
T = TypeVar("T")
# What a job's future gets: its rows of the logits [B, C] and, with explain, of each term's
# contribution [K, B, C].
JobResult: TypeAlias = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class Job:
    items: list[torch.Tensor]  # decoded inputs of one request (Preprocessor.decode_inputs)
    plan: Plan
    future: asyncio.Future[JobResult]
    loop: asyncio.AbstractEventLoop
    # host tensors of the components the device lacked at admission, and the purge epoch
    # they are valid from (the default, epoch 0, refuses any version purged so far)
    staged: Staged = field(default_factory=Staged)
    admitted: float = field(default_factory=time.perf_counter)
    # the request's id (read from the context where the job is made), for the device
    # thread's log lines about it
    request_id: str | None = field(default_factory=current_request_id)

    def release_staged(self) -> None:
        """Let go of the host tensors it brought (its batch has run: the device caches keep
        what they need); the epoch stays."""
        self.staged = Staged(self.staged.epoch)


@dataclass
class Control(Generic[T]):
    action: Callable[[], T]
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None
    request_id: str | None = field(default_factory=current_request_id)  # for its log line

    def outcome(self) -> T:
        """The action's result, or its exception raised here (call only once done)."""
        if self.error is not None:
            raise self.error
        return cast(T, self.result)


_STOP = object()


class DeviceWorker:
    def __init__(self, executor: Executor, collate: Callable[[Sequence[torch.Tensor]], ModelInput],
                 metrics: Metrics, max_batch: int, max_delay_s: float, max_queue: int) -> None:
        self.executor, self.collate, self.metrics = executor, collate, metrics
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0  # jobs admitted and not yet taken by the worker
        self._incoming = 0  # requests being decoded/resolved: jobs that will arrive soon
        self._lock = threading.Lock()
        self._stopped = False  # the loop has ended: nothing queued from now on would run
        self._thread = threading.Thread(target=self._loop, name="tmc-device", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    def announce_incoming(self) -> None:
        """A request started decoding and will submit a job soon: while any is announced,
        the batcher keeps collecting (up to its queue delay) rather than run a short batch.
        Pair every call with one ``withdraw_incoming``."""
        with self._lock:
            self._incoming += 1

    def withdraw_incoming(self) -> None:
        """An announced request no longer counts as coming soon: it submitted its job,
        failed, or waits on storage (the batcher must not hold a batch for it)."""
        with self._lock:
            self._incoming -= 1

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopped:
                raise OverloadedError("server is shutting down; retry on another replica")
            if self._pending >= self.max_queue:
                raise OverloadedError(f"queue is full ({self.max_queue} requests waiting); "
                                      "retry after a short delay")
            self._pending += 1
            self._queue.put(job)  # under the lock: the loop's end cannot strand it
        self.metrics.queue_depth.set(self._pending)

    def call(self, action: Callable[[], T], timeout: float = 30.0) -> T:
        """Run action on the device thread, between groups; wait for it; return its result.

        The action's exception is raised here. ``DeviceTimeoutError`` when it has not
        finished within ``timeout`` (it may still run later); ``NotReadyError`` at once
        when the device thread is not running (never started, or stopped).
        Called on the device thread itself — a registry forget hook fired by an executor
        that loads components itself (benches, tools; the service's stages them at
        admission) — it runs at once: queueing it there would wait for this very thread
        (the whole device stalled for ``timeout``).
        """
        control = Control(action)
        if threading.current_thread() is self._thread:
            self._run_control(control)
            return control.outcome()
        with self._lock:
            if self._stopped or not self._thread.is_alive():
                raise NotReadyError("the device worker is not running (stopped or never "
                                    "started)")
            self._queue.put(control)
        if not control.done.wait(timeout):
            raise DeviceTimeoutError(f"the device thread did not run {_name(action)} within "
                                     f"{timeout:g} s; it is busy or stuck")
        return control.outcome()

    def _loop(self) -> None:
        try:
            while self._collect_and_run():
                pass
        finally:
            self._refuse_leftovers()

    def _collect_and_run(self) -> bool:
        """Collect one batch and run it; False once a stop arrived. The batch lives in this
        frame only: the jobs (and the host tensors they brought) are released when it has
        run, not kept while the thread waits for the next batch or runs a purge. The jobs
        also let go of their tensors then: an exception handed to a request keeps this
        thread's frames of the batch (its traceback), and through them the jobs."""
        batch, stopping = self._collect()
        try:
            self._run_jobs(batch)
        finally:
            for job in batch:
                job.release_staged()
        return not stopping

    def _run_jobs(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.future.done() and self._still_valid(j)]
        groups: dict[str, list[Job]] = {}
        for job in live:
            groups.setdefault(job.plan.group_key, []).append(job)
        if groups:
            self.metrics.observe_batch(sum(len(j.items) for j in live), len(groups))
            self._run_batch(list(groups.values()))

    def _still_valid(self, job: Job) -> bool:
        """False (and the job failed with NotFoundError, which the service re-plans) when a
        version of its plan was purged after the job's epoch: what it brought, or a cached
        Δ it counted on, predates a forget. Runs on this thread, where purges run too."""
        gone = self.executor.purges.forgotten_since(job.plan.digests, job.staged.epoch)
        if not gone:
            return True
        log.info("component version %s was forgotten after the request was admitted; "
                 "it is resolved again", gone[0][:12],
                 extra={"event": "purged_since_admission", "request_id": job.request_id})
        _resolve(job, error=NotFoundError(
            f"component version {gone[0]} was forgotten after this request was admitted"))
        return False

    def _collect(self) -> tuple[list[Job], bool]:
        """Jobs for one batch, and whether a stop arrived (the batch runs, then the loop ends)."""
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
                return batch, True
            if isinstance(got, Control):
                self._run_control(got)
                continue
            self._take(got)
            batch.append(got)
            items += len(got.items)
            deadline = deadline or time.perf_counter() + self.max_delay_s
        return batch, False

    def _nothing_coming(self) -> bool:
        """No job queued and no request on its way: waiting would only add latency."""
        return self._incoming == 0 and self._queue.empty()

    def _take(self, job: Job) -> None:
        with self._lock:
            self._pending -= 1
        self.metrics.queue_depth.set(self._pending)
        self.metrics.queue_seconds.observe(time.perf_counter() - job.admitted)

    def _run_control(self, control: Control[T]) -> None:
        try:
            control.result = control.action()
        except BaseException as exc:  # the caller gets it, never a result that is not one
            control.error = exc
            if not isinstance(exc, Exception):
                raise
            log.warning("control %s failed: %s", _name(control.action), exc,  # thread lives on
                        extra={"request_id": control.request_id})
        finally:
            control.done.set()

    def _refuse_leftovers(self) -> None:
        """The loop has ended: what is still queued would never run, so it fails now."""
        with self._lock:
            self._stopped = True
        while True:
            try:
                got = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(got, Control):
                got.error = NotReadyError("the device worker stopped before running this")
                got.done.set()
            elif isinstance(got, Job):
                self._take(got)
                with contextlib.suppress(RuntimeError):  # its event loop is already closed
                    _resolve(got, error=OverloadedError(
                        "server is shutting down; retry on another replica"))

    def _run_batch(self, groups: list[list[Job]]) -> None:
        """One trunk pass for the whole batch, one tail per composition group, then ONE wait
        for the device (results of every group copied back without blocking before it)."""
        started = time.perf_counter()
        try:
            h = self.executor.trunk(self.collate([i for g in groups for j in g for i in j.items]))
        except Exception:  # isolate the culprit: each group runs on its own
            log.warning("batch trunk failed; retrying group by group", exc_info=True,
                        extra={"request_ids": _ids(j for g in groups for j in g)})
            self._finish([self._launch_group(jobs, None) for jobs in groups])
            return
        self.metrics.trunk_seconds.observe(time.perf_counter() - started)
        launched, start = [], 0
        for jobs in groups:
            rows = sum(len(j.items) for j in jobs)
            launched.append(self._launch_group(jobs, select_rows(h, slice(start, start + rows))))
            start += rows
        self._finish(launched)

    def _launch_group(self, jobs: list[Job], h: object | None) -> Launched | None:
        """Queue the tail (or, with h None, the whole network) of one composition on the
        device; a group that fails to launch fails alone (None)."""
        plan, started = jobs[0].plan, time.perf_counter()
        staged = _staged_tensors(jobs)
        try:
            logits, contrib = self._queue_tail(plan, h, jobs, staged)
        except Exception as exc:  # this group fails alone
            # its requests get exc; the finished frames of its traceback would keep their
            # locals (the staged host tensors) alive with it: cleared, lines kept for logs
            traceback.clear_frames(exc.__traceback__)
            log.warning("group %s failed: %s", plan.group_key[:12], exc,
                        extra={"group": plan.group_key[:12], "request_ids": _ids(jobs)})
            for j in jobs:
                _resolve(j, error=exc)
            return None
        finally:
            # queued (the device caches hold what they keep) or failed: a cleared frame
            # still holds its function, and a closure over this dict (the executor's
            # builders) would keep every tensor in it with a failed group's traceback
            staged.clear()
        return Launched(jobs, logits, contrib, started)

    def _queue_tail(self, plan: Plan, h: object | None, jobs: list[Job],
                    staged: dict[str, HostTensors]) -> JobResult:
        """``_launch_group``'s work: logits [B, C] and, with explain, contributions [K, B, C]."""
        if h is None:
            h = self.executor.trunk(self.collate([i for j in jobs for i in j.items]))
        if plan.explain:
            return self.executor.explain_tail_async(plan, h, staged)
        return self.executor.tail_async(plan, h, staged), None

    def _finish(self, launched: Sequence[Launched | None]) -> None:
        """Wait once for the device, then hand each job its rows."""
        groups = [g for g in launched if g is not None]
        try:
            self.executor.synchronize()
        except Exception as exc:  # an asynchronous device error: nothing queued is valid
            log.warning("device failed while running a batch: %s", exc,
                        extra={"request_ids": _ids(j for g in groups for j in g.jobs)})
            for g in groups:
                for j in g.jobs:
                    _resolve(j, error=exc)
            return
        for g in groups:
            plan = g.jobs[0].plan
            kind = "plain" if not plan.terms else ("explain" if plan.explain else "linearized")
            self.metrics.forward_seconds.labels(kind=kind).observe(
                time.perf_counter() - g.started)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("group ran", extra={
                    "group": plan.group_key[:12], "kind": kind, "generation": plan.generation,
                    "rows": sum(len(j.items) for j in g.jobs), "request_ids": _ids(g.jobs),
                    "forward_s": round(time.perf_counter() - g.started, 6)})
            start = 0
            for j in g.jobs:
                end = start + len(j.items)
                part = None if g.contrib is None else g.contrib[:, start:end]
                _resolve(j, result=(g.logits[start:end], part))
                start = end


@dataclass
class Launched:
    """A group whose tail is queued on the device; its host tensors fill at the sync."""

    jobs: list[Job]
    logits: torch.Tensor  # [B, C] host memory
    contrib: torch.Tensor | None  # [K, B, C] host memory (explain only)
    started: float


def _staged_tensors(jobs: Iterable[Job]) -> dict[str, HostTensors]:
    """Every host tensor the jobs of one group brought, by component digest."""
    return {d: t for j in jobs for d, t in j.staged.tensors.items()}


def _ids(jobs: Iterable[Job]) -> list[str | None]:
    """The request ids of jobs, for a log line about their group or batch."""
    return [j.request_id for j in jobs]


def _name(action: Callable[[], object]) -> str:
    """For messages: ``Executor.purge`` for a partial of it, ``Service._warm_up``, ..."""
    func = getattr(action, "func", action)  # functools.partial
    return str(getattr(func, "__qualname__", type(func).__name__))


def _resolve(job: Job, result: JobResult | None = None,
             error: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        elif result is not None:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(settle)
