"""Staging component tensors at admission, off the device thread.

Policy. The device thread never reads storage: no index read, blob fetch, sha256 or
safetensors parse runs on it. When a request is admitted (after its plan is resolved, before
its job is queued) the service asks the executor which component versions the device will
need and does not hold (``Executor.to_stage``: none when the composed Δ is cached, except for
``explain``, which needs every component), and this module fetches, verifies and decodes them
to CPU tensors on a bounded pool. The job carries those host tensors (strong references); the
device thread only casts and moves them (``cast_delta``).

- Bounded: ``TMC_FETCH_THREADS`` fetch at once and at most ``TMC_FETCH_QUEUE_SIZE`` more wait;
  a request that needs a new fetch beyond that is refused at once (503 ``OverloadedError``).
- Single flight: requests that need the same cold version while it is being fetched share
  that one fetch (``digest -> flight``, removed when it ends). A failure reaches every
  request waiting for it and is not remembered: the next request fetches again.
- A request waits at most ``TMC_FETCH_TIMEOUT_S`` for its fetches, then gets a 503 naming the
  version and the store (``StorageError``); the fetch itself runs on and may serve later ones.
- A slow or failing store fails only the requests that need it, before they are queued:
  their batch-mates never wait for storage.
- Decoding (``decode_tensors``) copies each tensor's bytes out of the verified file with the
  GIL released: ``safetensors.torch.load`` copies holding it, ~0.1 s per 100 MB measured here,
  and every Python step of the device thread and of the event loop waited for it.

Measured (bench/cold_fetch.py: 105 MB components, embedded registry, 2-core VM): the p99 of
a warm composition while another client keeps asking for cold components went from 1142 ms
(cold bytes read, hashed and parsed on the device thread) to 243 ms; its idle p99 is 42 ms.

Forgetting stays exact (``PurgeLog``). A forget purges the device caches with a control
command on the device thread, and its receipt returns after that purge. Every purge
advances the purge epoch and records, per digest, the epoch of its last purge. A request reads
the epoch before it resolves its plan, and each fetch reads it before it reads the index;
the job keeps the smallest of those epochs. Just before a batch runs (on the device thread,
where purges also run, so nothing can slip in between) a job one of whose digests was purged
after its epoch fails with ``NotFoundError``, which the service turns into a re-plan: tensors
fetched before a forget are never used after it, whether they arrived before or after the
purge, and a composed Δ cached at admission and purged since is not rebuilt from them. A
version added again after a forget (same bytes, same digest) is served again: its new
requests have a later epoch. A flight that started before a purge of its digest is not
joined by later requests; they start a new fetch.

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
import json
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from app.errors import OverloadedError
from app.metrics import Metrics
from app.settings import Settings
from registry.errors import StorageError

HostTensors = dict[str, torch.Tensor]  # parameter name -> CPU tensor of one version
LoadTensors = Callable[[str], HostTensors]
# Tombstones kept: a job admitted before the oldest one dropped is re-planned (see PurgeLog).
KEEP_PURGED = 65536
# safetensors dtype names decode_tensors copies itself (others: safetensors.torch.load)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class NotStagedError(OverloadedError):
    """The device needs a component the job did not bring and the cache no longer holds (it
    was evicted after admission). The service admits the request again with every component
    staged; if it ever escaped, 503 (retry) is the right answer."""


@dataclass(frozen=True)
class Staged:
    """What a job brings to the device: the purge epoch it is valid from (see the module
    docstring), and the host tensors of the components it needs that the device lacked."""

    epoch: int = 0  # 0: admitted before any purge (a job built without one: the safe default)
    tensors: Mapping[str, HostTensors] = field(default_factory=dict)


class PurgeLog:
    """When each component digest was last purged from this process's device caches.

    ``record`` runs on the device thread (``Executor.purge``); ``epoch`` and
    ``forgotten_since`` may be read from any thread. Only the newest ``keep`` digests are
    remembered; a job older than the oldest one forgotten here counts as purged (it is
    re-planned, never served from what it brought).
    """

    def __init__(self, keep: int = KEEP_PURGED) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._last: OrderedDict[str, int] = OrderedDict()  # digest -> epoch of its last purge
        self._floor = 0  # the newest epoch among the tombstones dropped
        self._keep = keep

    @property
    def epoch(self) -> int:
        return self._epoch

    def record(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._epoch += 1
            for digest in digests:
                self._last[digest] = self._epoch
                self._last.move_to_end(digest)
            while len(self._last) > self._keep:
                _, dropped = self._last.popitem(last=False)
                self._floor = max(self._floor, dropped)

    def forgotten_since(self, digests: Collection[str], epoch: int) -> list[str]:
        """Those of ``digests`` purged after ``epoch`` (all of them when that is unknowable)."""
        if not digests:
            return []
        with self._lock:
            if epoch < self._floor:
                return sorted(digests)
            return sorted(d for d in digests if self._last.get(d, 0) > epoch)


@dataclass
class _Flight:
    """One fetch of one version, shared by every request that needs it meanwhile."""

    digest: str
    epoch: int  # the purge epoch read before the fetch read the index
    future: concurrent.futures.Future[HostTensors]


class Fetcher:
    """Fetches, verifies and decodes cold component versions on a bounded pool."""

    def __init__(self, load: LoadTensors, purges: PurgeLog, *, threads: int, max_waiting: int,
                 timeout_s: float, store: str, metrics: Metrics | None = None) -> None:
        self.load, self.purges, self.store, self.metrics = load, purges, store, metrics
        self.threads, self.max_waiting, self.timeout_s = threads, max_waiting, timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                           thread_name_prefix="tmc-fetch")
        # reentrant: a fetch that ends before its done callback is added runs it at once,
        # inside _start, which holds the lock
        self._lock = threading.RLock()
        self._flights: dict[str, _Flight] = {}
        self._outstanding = 0  # fetches running or waiting for a thread

    @classmethod
    def from_settings(cls, settings: Settings, load: LoadTensors, purges: PurgeLog, store: str,
                      metrics: Metrics | None = None) -> Fetcher:
        """``store``: where the bytes come from, for messages (``Registry.blob_where``)."""
        return cls(load, purges, threads=settings.fetch_threads,
                   max_waiting=settings.fetch_queue_size, timeout_s=settings.fetch_timeout_s,
                   store=store, metrics=metrics)

    async def stage(self, digests: Collection[str], epoch: int) -> Staged:
        """Host tensors of ``digests`` and the epoch they are valid from (``epoch``: read by
        the caller before it resolved its plan). Raises what the fetch raised
        (``NotFoundError`` when a version was forgotten meanwhile, ``StorageError``),
        ``StorageError`` on timeout, ``OverloadedError`` when the pool is saturated."""
        if not digests:
            return Staged(epoch)
        flights = self._join_or_start(sorted(digests))
        waits = {asyncio.wrap_future(f.future): f for f in flights}
        for w in waits:
            w.add_done_callback(_retrieve)  # a waiter gone (timeout) leaves no warning behind
        done, pending = await asyncio.wait(waits, timeout=self.timeout_s)
        if pending:
            late = min(waits[w].digest for w in pending)
            raise StorageError(
                f"fetching component version {late} from {self.store} did not finish within "
                f"{self.timeout_s:g} s (TMC_FETCH_TIMEOUT_S): the store is slow or "
                "unreachable; retry later")
        for w in sorted(done, key=lambda w: waits[w].digest):
            if w.cancelled():
                raise OverloadedError("server is shutting down; retry on another replica")
            error = w.exception()
            if error is not None:
                raise error
        return Staged(min([epoch, *(f.epoch for f in flights)]),
                      {f.digest: f.future.result() for f in flights})

    def _join_or_start(self, digests: list[str]) -> list[_Flight]:
        """The flight of each digest: joined when one is on its way and no purge of its digest
        came after it started, else started (all or none: OverloadedError when the new ones
        would not fit)."""
        with self._lock:
            joined = {d: f for d in digests if (f := self._flights.get(d)) is not None
                      and not self.purges.forgotten_since([d], f.epoch)}
            new = [d for d in digests if d not in joined]
            if self._outstanding + len(new) > self.threads + self.max_waiting:
                raise OverloadedError(
                    f"component fetching is saturated ({self.threads} fetching, "
                    f"{self.max_waiting} waiting; TMC_FETCH_THREADS, TMC_FETCH_QUEUE_SIZE): "
                    f"{len(new)} more version(s) from {self.store} cannot be queued; retry "
                    "after a short delay")
            started = {d: self._start(d) for d in new}
        if self.metrics is not None and joined:
            self.metrics.component_fetches.labels(kind="shared").inc(len(joined))
        return [joined.get(d) or started[d] for d in digests]

    def _start(self, digest: str) -> _Flight:
        """Submit one fetch (under ``_lock``)."""
        flight = _Flight(digest, self.purges.epoch, self._pool.submit(self._fetch, digest))
        self._flights[digest] = flight
        self._outstanding += 1
        flight.future.add_done_callback(lambda _: self._landed(flight))
        return flight

    def _fetch(self, digest: str) -> HostTensors:
        """On a fetch thread: index check, blob read, sha256, safetensors parse."""
        started = time.perf_counter()
        tensors = self.load(digest)
        if self.metrics is not None:
            self.metrics.component_fetch_seconds.observe(time.perf_counter() - started)
        return tensors

    def _landed(self, flight: _Flight) -> None:
        with self._lock:
            self._outstanding -= 1
            if self._flights.get(flight.digest) is flight:
                del self._flights[flight.digest]  # failures are not cached; nor are results
        if self.metrics is not None:
            failed = flight.future.cancelled() or flight.future.exception() is not None
            self.metrics.component_fetches.labels(
                kind="failed" if failed else "fetched").inc()

    @property
    def in_flight(self) -> int:
        return self._outstanding

    def shutdown(self) -> None:
        """Stop taking fetches; queued ones are cancelled (their requests get 503)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def verified_tensors(load_bytes: Callable[[str], bytes]) -> LoadTensors:
    """A version's tensors from its verified bytes (``Registry.load_bytes``: index check,
    blob read, sha256), decoded by ``decode_tensors``."""
    return lambda digest: decode_tensors(load_bytes(digest))


def decode_tensors(data: bytes) -> HostTensors:
    """safetensors bytes -> CPU tensors of their own (writable, in the file's dtypes). Each
    tensor's bytes are copied by numpy, which releases the GIL while it copies."""
    (size,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + size])
    header.pop("__metadata__", None)
    if sys.byteorder != "little" or any(h["dtype"] not in DTYPES for h in header.values()):
        return dict(st_load(data))  # the file is little-endian; odd dtypes: the library
    return {name: _copy_out(data, 8 + size, h) for name, h in header.items()}


def _copy_out(data: bytes, start: int, entry: dict[str, Any]) -> torch.Tensor:
    """One header entry's tensor, copied out of ``data`` (its data section at ``start``)."""
    begin, end = (int(v) for v in entry["data_offsets"])
    shape = [int(n) for n in entry["shape"]]
    out = torch.empty(shape, dtype=DTYPES[entry["dtype"]])  # [*shape], the file's dtype
    raw = out.reshape(-1).view(torch.uint8).numpy()  # out's bytes, flat
    if raw.size != end - begin:
        raise ValueError(f"safetensors entry {entry}: {end - begin} bytes for a tensor of "
                         f"{raw.size}")
    raw[:] = np.frombuffer(data, np.uint8, end - begin, start + begin)
    return out


def _retrieve(future: asyncio.Future[HostTensors]) -> None:
    if not future.cancelled():
        future.exception()
