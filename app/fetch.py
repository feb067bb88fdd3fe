"""Staging component tensors at admission, off the device thread.

Policy. The device thread never reads storage: no index read, blob fetch, sha256 or
safetensors parse runs on it. When a request is admitted (after its plan is resolved, before
its job is queued) the service asks the executor which component versions the device will
need and does not hold (``Executor.to_stage``: none when the composed Δ is cached, except for
``explain``, which needs every component), and this module fetches, verifies and decodes them
to CPU tensors on a bounded pool. The job carries those host tensors (strong references); the
device thread only casts and moves them (``cast_delta``).

- Bounded by requests, not by versions: ``TMC_FETCH_THREADS`` fetch at once. The fetches one
  request starts form one batch, and at most ``TMC_FETCH_THREADS + TMC_FETCH_QUEUE_SIZE``
  batches may be unfinished; a request that needs a new fetch beyond that is refused at once
  (503 ``OverloadedError``). A request that only joins fetches already on their way is
  always admitted. So a composition of 1,000 cold components is one waiting request whose
  versions go through the threads in turn, and the work queued is bounded by that many
  requests' compositions (each bounded by the registry's resolve limits and by the byte
  budget below). The earlier bound counted versions (4 + 16 by default) and refused a
  request needing more than that outright, so ``"*"`` over more active components, or any
  explicit composition of 21 cold ones, could never be served, and each retry asked again.
- Fair: free threads take the next queued version of each batch in turn (round robin; a
  new batch takes its turn last), so a small cold request's first fetch starts after at most
  one fetch of each batch queued ahead of it, and a giant composition gets 1/B of the
  threads while B batches are queued, never none. A request that joins a version
  queued in another request's batch waits for that batch's turn (it is not moved ahead).
- Dropped when nobody waits: when a request stops waiting (served, failed at its first
  failing version, timed out, cancelled), the versions it queued that no other request
  waits for and no thread took are cancelled; a retry queues them again. Bytes already
  fetched stay in the replica's local byte cache (Redis index) or the OS page cache (files),
  so a retry of a composition too slow for one request deadline goes faster.
- Single flight: requests that need the same cold version while it is queued or being
  fetched share that one fetch (``digest -> flight``, removed when it ends). A failure
  reaches every request waiting for it and is not remembered: the next request fetches
  again.
- Timeout per fetch, not per request: a request fails with a 503 naming the version and the
  store (``StorageError``) when one of its fetches has run on a thread for longer than
  ``TMC_FETCH_TIMEOUT_S``; the fetch itself runs on and may serve later ones. Time spent
  waiting for a thread does not count: a composition of k cold versions needs about
  k / threads fetch times, which no fixed per-request fetch timeout fits; the whole request
  is bounded by ``TMC_REQUEST_TIMEOUT_S`` (504), as every other wait is.
- Host memory: the tensors a request stages are counted as they land; past
  ``TMC_FETCH_MAX_REQUEST_BYTES`` the request fails with 413 (``StagingTooLargeError``)
  and its queued versions are dropped. The host peak per request is then at most that budget
  plus the versions on threads (each at most ``TMC_MAX_COMPONENT_BYTES``, bytes and tensors
  both while it decodes). The device compose needs every component tensor of a composition
  at once anyway (``Executor._compose``), so the same peak existed on the device before
  staging moved it to admission; the budget makes it a refusal instead of an out-of-memory.
  The index records no sizes the service can read at admission, so the refusal comes after
  at most the budget has been fetched, not before.
- A slow or failing store fails only the requests that need it, before they are queued:
  their batch-mates never wait for storage.
- Decoding: ``app.host_tensors.decode_tensors`` (the GIL is released while bytes are copied).

Measured (bench/cold_fetch.py: 105 MB components, embedded registry, 2-core VM): the p99 of
a warm composition while another client keeps asking for cold components went from 1142 ms
(cold bytes read, hashed and parsed on the device thread) to 243 ms; its idle p99 is 42 ms.
``"*"`` over 1,000 active cold components with the default pool (bench/scale.py --quick,
2-core VM at load 4-6): refused (503) under the earlier per-version bound; now staged in 5.2 s
(Redis index + S3) and 2.3 s (SQLite + files); through HTTP on the tiny test base, 0.49 s,
while a small cold request sent meanwhile was answered in 37 ms.

Forgetting stays exact: the purge epochs of ``app.purges.PurgeLog`` (see there) tell the
device thread, just before a batch runs, which jobs carry tensors fetched before a forget of
their versions; those jobs are re-planned. Each fetch reads the epoch when it is queued
(before it reads the index), and a flight queued before a purge of its digest is not joined
by later requests; they queue a new fetch.

A cached Δ evicted (not purged) between admission and run: the device thread raises
``NotStagedError`` and the service admits the request once more with *every* component of its
plan staged. The other choice, staging host copies for every job even when its composed Δ is
cached, would read storage (or pin host copies of every warm composition's components) for
every request of a warm composition, to cover a race that needs the LRU to cycle between one
request's admission and its batch. The retried job brings all the tensors it needs, so it
cannot miss again; only a forget can fail it, and that re-plans.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import partial

from app.errors import BodyTooLargeError, OverloadedError
from app.host_tensors import HostTensors, LoadTensors
from app.metrics import Metrics
from app.purges import PurgeLog
from app.settings import Settings
from registry.errors import StorageError


class NotStagedError(OverloadedError):
    """The device needs a component the job did not bring and the cache no longer holds (it
    was evicted after admission). The service admits the request again with every component
    staged; if it ever escaped, 503 (retry) is the right answer."""


class StagingTooLargeError(BodyTooLargeError):
    """A request's cold components would hold more host memory than
    ``TMC_FETCH_MAX_REQUEST_BYTES`` (413: retrying the same request does not help)."""


@dataclass(frozen=True)
class Staged:
    """What a job brings to the device: the purge epoch it is valid from (see the module
    docstring), and the host tensors of the components it needs that the device lacked."""

    epoch: int = 0  # 0: admitted before any purge (a job built without one: the safe default)
    tensors: Mapping[str, HostTensors] = field(default_factory=dict)


@dataclass(eq=False)
class _Batch:
    """The new fetches one request started: taken by the pool one per turn (round robin)."""

    queued: deque[_Flight] = field(default_factory=deque)  # not yet given to a thread
    unfinished: int = 0  # flights neither landed nor cancelled; 0: the batch no longer counts


@dataclass(eq=False)
class _Flight:
    """One fetch of one version, shared by every request that needs it meanwhile."""

    digest: str
    epoch: int  # the purge epoch read before the fetch was queued (so before its index read)
    batch: _Batch
    future: concurrent.futures.Future[HostTensors] = field(
        default_factory=concurrent.futures.Future)
    waiters: int = 0  # requests waiting for it; a queued flight nobody waits for is cancelled
    started: float | None = None  # time.monotonic() when a fetch thread took it


class Fetcher:
    """Fetches, verifies and decodes cold component versions on a bounded pool."""

    def __init__(self, load: LoadTensors, purges: PurgeLog, *, threads: int, max_waiting: int,
                 timeout_s: float, store: str, max_request_bytes: int | None = None,
                 metrics: Metrics | None = None) -> None:
        """``max_waiting``: requests with fetches of their own beyond ``threads`` (see the
        module docstring); ``max_request_bytes``: None, no budget (the benchmarks)."""
        self.load, self.purges, self.store, self.metrics = load, purges, store, metrics
        self.threads, self.max_waiting, self.timeout_s = threads, max_waiting, timeout_s
        self.max_request_bytes = max_request_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                           thread_name_prefix="tmc-fetch")
        self._lock = threading.RLock()
        self._flights: dict[str, _Flight] = {}  # digest -> the flight new requests join
        self._turns: deque[_Batch] = deque()  # batches with queued flights, in turn order
        self._running: set[_Flight] = set()  # given to the pool: at most ``threads``
        self._batches = 0  # batches with unfinished flights (the admission bound)
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, load: LoadTensors, purges: PurgeLog, store: str,
                      metrics: Metrics | None = None) -> Fetcher:
        """``store``: where the bytes come from, for messages (``Registry.blob_where``)."""
        return cls(load, purges, threads=settings.fetch_threads,
                   max_waiting=settings.fetch_queue_size, timeout_s=settings.fetch_timeout_s,
                   store=store, max_request_bytes=settings.fetch_max_request_bytes,
                   metrics=metrics)

    @property
    def max_batches(self) -> int:
        return self.threads + self.max_waiting

    async def stage(self, digests: Collection[str], epoch: int) -> Staged:
        """Host tensors of ``digests`` and the epoch they are valid from (``epoch``: read by
        the caller before it resolved its plan). Raises what a fetch raised (``NotFoundError``
        when a version was forgotten meanwhile, ``StorageError``), ``StorageError`` when a
        fetch runs past the timeout, ``OverloadedError`` when too many requests wait for
        fetches, ``StagingTooLargeError`` past the byte budget. However it ends, the fetches
        it started that nobody else waits for and no thread has taken are dropped."""
        if not digests:
            return Staged(epoch)
        flights = self._join_or_start(sorted(set(digests)))
        try:
            tensors = await self._collect(flights)
        finally:
            self._leave(flights)
        return Staged(min([epoch, *(f.epoch for f in flights)]), tensors)

    async def _collect(self, flights: list[_Flight]) -> dict[str, HostTensors]:
        """Each flight's tensors as it lands (its failure at once), watching the fetch
        timeout of those running and the request's byte budget."""
        loop = asyncio.get_running_loop()
        landed: asyncio.Queue[str] = asyncio.Queue()  # digests, as their flights land
        for f in flights:  # the callback names the digest, not the flight: see _tell
            f.future.add_done_callback(partial(_tell, loop, landed, f.digest))
        by_digest = {f.digest: f for f in flights}
        mine, nbytes = set(flights), 0
        tensors: dict[str, HostTensors] = {}
        while len(tensors) < len(flights):
            wait_s = self._next_check(mine)  # raises for a fetch past its timeout
            try:
                flight = by_digest[await asyncio.wait_for(landed.get(), wait_s)]
            except TimeoutError:
                continue
            tensors[flight.digest] = _outcome(flight)
            nbytes += sum(t.nbytes for t in tensors[flight.digest].values())
            self._check_budget(nbytes, len(tensors), len(flights))
        return tensors

    def _next_check(self, mine: set[_Flight]) -> float:
        """Seconds until the first of ``mine`` running now would pass the fetch timeout
        (``timeout_s`` when none runs); StorageError when one already has."""
        now = time.monotonic()
        with self._lock:
            started = [(f.started, f.digest) for f in self._running
                       if f in mine and f.started is not None and not f.future.done()]
        if not started:
            return self.timeout_s
        first, digest = min(started)
        left = first + self.timeout_s - now
        if left <= 0:
            raise StorageError(
                f"fetching component version {digest} from {self.store} did not finish within "
                f"{self.timeout_s:g} s (TMC_FETCH_TIMEOUT_S, counted from when a fetch thread "
                "took it): the store is slow or unreachable; retry later")
        return left

    def _check_budget(self, nbytes: int, landed: int, wanted: int) -> None:
        if self.max_request_bytes is None or nbytes <= self.max_request_bytes:
            return
        raise StagingTooLargeError(
            f"the composition's cold components need more than {self.max_request_bytes} bytes "
            f"of host memory at once ({nbytes} bytes for {landed} of the {wanted} versions not "
            "in the device cache; TMC_FETCH_MAX_REQUEST_BYTES): compose fewer components per "
            "request, or raise TMC_FETCH_MAX_REQUEST_BYTES (and the host memory) to serve it")

    def _join_or_start(self, digests: list[str]) -> list[_Flight]:
        """The flight of each digest: joined when one is on its way and no purge of its digest
        came after it was queued, else queued in one new batch (OverloadedError when
        ``max_batches`` requests already wait for fetches of their own)."""
        with self._lock:
            if self._closed:
                raise OverloadedError("server is shutting down; retry on another replica")
            joined = {d: f for d in digests if (f := self._flights.get(d)) is not None
                      and not self.purges.forgotten_since([d], f.epoch)}
            new = [d for d in digests if d not in joined]
            if new and self._batches >= self.max_batches:
                raise OverloadedError(
                    f"component fetching is saturated ({self._batches} requests waiting for "
                    f"cold versions, the most allowed: {self.threads} + {self.max_waiting}, "
                    f"TMC_FETCH_THREADS + TMC_FETCH_QUEUE_SIZE): this one needs {len(new)} "
                    f"more version(s) from {self.store}; retry after a short delay")
            started = self._queue_batch(new) if new else {}
            flights = [joined.get(d) or started[d] for d in digests]
            for f in flights:
                f.waiters += 1
            self._pump()
        if self.metrics is not None and joined:
            self.metrics.component_fetches.labels(kind="shared").inc(len(joined))
        return flights

    def _queue_batch(self, digests: list[str]) -> dict[str, _Flight]:
        """Queue one request's new fetches as one batch, taking its turn last (under
        ``_lock``)."""
        batch, epoch = _Batch(unfinished=len(digests)), self.purges.epoch
        flights = {d: _Flight(d, epoch, batch) for d in digests}
        batch.queued.extend(flights.values())
        self._flights.update(flights)
        self._batches += 1
        self._turns.append(batch)
        return flights

    def _pump(self) -> None:
        """Give free threads the next queued flight of each batch in turn (under ``_lock``)."""
        while len(self._running) < self.threads and self._turns:
            batch = self._turns.popleft()
            flight = _next_queued(batch)
            if flight is None:
                continue  # the rest of it was cancelled
            if batch.queued:
                self._turns.append(batch)
            self._running.add(flight)
            self._pool.submit(self._fetch, flight)

    def _fetch(self, flight: _Flight) -> None:
        """On a fetch thread: index check, blob read, sha256, safetensors parse."""
        if not flight.future.set_running_or_notify_cancel():  # cancelled at shutdown
            self._finished(flight)
            return
        flight.started = time.monotonic()
        began = time.perf_counter()
        try:
            tensors = self.load(flight.digest)
        except BaseException as exc:
            self._finished(flight, "failed")
            flight.future.set_exception(exc)
            return
        if self.metrics is not None:
            self.metrics.component_fetch_seconds.observe(time.perf_counter() - began)
        self._finished(flight, "fetched")
        flight.future.set_result(tensors)

    def _finished(self, flight: _Flight, kind: str | None = None) -> None:
        """A flight left its thread: free the thread for the next turn. Results and failures
        are not kept: the next request for the version fetches it again."""
        with self._lock:
            self._running.discard(flight)
            self._forget_flight(flight)
            self._pump()
        if self.metrics is not None and kind is not None:
            self.metrics.component_fetches.labels(kind=kind).inc()

    def _forget_flight(self, flight: _Flight) -> None:
        """Under ``_lock``: new requests no longer join it; its batch has one fewer."""
        if self._flights.get(flight.digest) is flight:
            del self._flights[flight.digest]
        flight.batch.unfinished -= 1
        if flight.batch.unfinished == 0:
            self._batches -= 1

    def _leave(self, flights: list[_Flight]) -> None:
        """A request stopped waiting (served, failed, timed out, cancelled): its flights that
        nobody else waits for and that no thread took are cancelled."""
        with self._lock:
            for f in flights:
                f.waiters -= 1
                if (f.waiters == 0 and f not in self._running and not f.future.done()
                        and f.future.cancel()):
                    self._forget_flight(f)  # still in its batch's queue: _pump skips it

    @property
    def in_flight(self) -> int:
        """Fetches running or queued (a batch's ``unfinished`` counts its running ones too,
        and its cancelled ones stay in its queue until a turn skips them)."""
        with self._lock:
            queued = sum(not f.future.cancelled() for b in self._turns for f in b.queued)
            return queued + len(self._running)

    def shutdown(self, wait: bool = False) -> None:
        """Stop taking fetches; queued ones are cancelled (their requests get 503). With
        ``wait``, return once the fetch threads have ended (a running fetch lands first)."""
        with self._lock:
            self._closed = True
            queued = [f for b in self._turns for f in b.queued] + list(self._running)
            self._turns.clear()
        for f in queued:
            f.future.cancel()  # a running one is not cancelled: it lands as usual
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _next_queued(batch: _Batch) -> _Flight | None:
    while batch.queued:
        flight = batch.queued.popleft()
        if not flight.future.cancelled():
            return flight
    return None


def _tell(loop: asyncio.AbstractEventLoop, landed: asyncio.Queue[str], digest: str,
          _: concurrent.futures.Future[HostTensors]) -> None:
    """A flight's future is done (on the thread that finished it): tell its waiter's loop
    which digest landed. A future keeps its done callbacks, so a callback holding the flight
    would make a cycle (flight -> future -> callback -> flight) that keeps the decoded
    tensors (the future's result) alive until the cyclic garbage collector happens to run,
    long after a forget; with the digest, they go when the last request lets go of them."""
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
        loop.call_soon_threadsafe(landed.put_nowait, digest)


def _outcome(flight: _Flight) -> HostTensors:
    if flight.future.cancelled():
        raise OverloadedError("server is shutting down; retry on another replica")
    return flight.future.result()
