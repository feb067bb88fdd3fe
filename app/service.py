"""The object graph of one replica, built once at startup: base, registry, worker, metrics.

Routes call ``Service.predict`` (native and V2 share it) and the admin methods; nothing
here speaks HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from starlette.concurrency import run_in_threadpool

import registry as reg
from app.composition import AllActive, BaseOnly, CompositionSpec, Explicit, Named, make_plan
from app.decode_pool import DecodePool
from app.errors import BadRequestError, OverloadedError, RequestTimeoutError
from app.executor import Executor, select_rows
from app.fetch import Fetcher, NotStagedError, Staged
from app.host_tensors import verified_tensors
from app.metrics import Metrics
from app.plan import Plan
from app.settings import Settings
from app.worker import DeviceWorker, Job, JobResult
from bases import Base, InputError, load_base
from bases.inputs import ImagePreprocessor
from registry.redis_persistence import persistence_report
from tangent import CompositionError, Normalize

log = logging.getLogger("tmc.service")
# A request whose pinned component version is forgotten before it runs is resolved again;
# each forget can cost it one round, so a bound keeps a storm of forgets from looping it.
MAX_REPLANS = 3
# The first forward may initialise the device and pick kernels: give it longer than a purge.
WARM_UP_TIMEOUT_S = 300.0


@dataclass
class Prediction:
    logits: torch.Tensor  # [B, C]
    contributions: torch.Tensor | None  # [K, B, C], terms in plan order sorted by digest
    plan: Plan


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("TMC_DEVICE=cuda but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def open_registry_for(settings: Settings, base: Base) -> reg.Registry:
    """The registry of ``base`` as ``settings`` configure it: the embedded folder, or the
    shared Redis index when $TMC_REDIS_URL is set; the bytes where $TMC_BLOB_URL says."""
    return reg.open_registry(
        registry_dir=None if settings.redis_url else settings.registry_dir,
        redis_url=settings.redis_url, base_fingerprint=base.fingerprint,
        region=base.region, max_component_bytes=settings.max_component_bytes,
        cache_dir=settings.blob_cache_dir,
        blob_url=settings.blob_url)


class Service:
    def __init__(self, settings: Settings, base: Base, registry: reg.Registry,
                 metrics: Metrics) -> None:
        self.settings, self.base, self.registry, self.metrics = settings, base, registry, metrics
        self.device = pick_device(settings.device)
        dtype = getattr(torch, settings.dtype)
        # no loader: the device thread reads no storage; components come staged with each
        # job, fetched at admission by the fetcher (app/fetch.py)
        self.executor = Executor(base.net, None, self.device, dtype, settings.cache_bytes,
                                 settings.compile)
        self.fetcher = Fetcher.from_settings(settings, verified_tensors(registry.load_bytes),
                                             self.executor.purges, registry.blob_where, metrics)
        self.worker = DeviceWorker(self.executor, base.preprocessor.collate, metrics,
                                   settings.max_batch_size, settings.max_queue_delay_ms / 1000,
                                   settings.max_queue_size)
        self.decode_pool = DecodePool(settings.decode_queue_size)
        self.draining = False
        self.ready = False
        self._purge_lock = threading.Lock()
        self._forgets_in_flight = 0  # local forget() calls inside their registry call
        self._deferred: set[str] = set()  # digests heard meanwhile: those calls purge them
        registry.on_forget(self._purge_on_forget_event)
        registry.on_lost(self._registry_lost_changed)

    @classmethod
    def build(cls, settings: Settings) -> Service:
        base = load_base(settings.base_dir)
        return cls(settings, base, open_registry_for(settings, base), Metrics())

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.worker.start()
        if self.settings.torch_threads is not None:  # OpenMP's thread count is per calling
            # thread: set it on the device thread, which runs the model
            self.worker.call(partial(torch.set_num_threads, self.settings.torch_threads))
        self._warm_up_or_fail()
        self.metrics.build.info({"base": self.base.spec.name,
                                 "base_fingerprint": self.base.fingerprint,
                                 "device": str(self.device), "version": "0.1.0"})
        self.ready = True

    def intra_op_threads(self) -> int:
        """torch's intra-op thread count as the device thread sees it."""
        return self.worker.call(torch.get_num_threads)

    def _warm_up_or_fail(self) -> None:
        """One forward on the device before serving; if it fails, the startup fails with why
        (the service never reports ready, and ``tmc serve`` exits non-zero)."""
        try:
            self.worker.call(self._warm_up, timeout=WARM_UP_TIMEOUT_S)
        except Exception as exc:
            log.error("warm-up forward failed: %s", exc)
            self.worker.stop(timeout=5.0)
            raise RuntimeError(f"warm-up forward failed: {exc}") from exc

    def _warm_up(self) -> None:
        """A plain forward and a linearized one (checked: J·Δ ≠ 0) at two batch sizes, so a
        compiled tail has compiled, batch dimension dynamic, before the first request."""
        example = self.base.preprocessor.example()  # two rows
        self.executor.run(make_plan([], 0, "none", False), example)
        for x in (example, select_rows(example, slice(0, 1))):
            self.executor.check_linearization(x)

    async def drain_and_stop(self) -> None:
        self.draining, self.ready = True, False
        started = time.monotonic()
        log.info("drain started", extra={"event": "drain_start", "pending": self.worker.pending,
                                         "drain_timeout_s": self.settings.drain_timeout_s})
        deadline = started + self.settings.drain_timeout_s
        while self.worker.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await run_in_threadpool(self.worker.stop, self.settings.drain_timeout_s)
        self.decode_pool.shutdown()
        self.fetcher.shutdown()
        self.registry.close()
        log.info("drain finished", extra={"event": "drain_end", "pending": self.worker.pending,
                                          "drain_s": round(time.monotonic() - started, 3)})

    # -- inference -------------------------------------------------------------------------
    async def predict(self, raw_inputs: Sequence[object], spec: CompositionSpec,
                      normalize: Normalize | None, explain: bool) -> Prediction:
        """One deadline (TMC_REQUEST_TIMEOUT_S) from admission to the result, whatever the
        request waits on: decoding, resolving, the queue, the device, and every re-plan."""
        if self.draining:
            raise OverloadedError("server is shutting down; retry on another replica")
        self._check_count(raw_inputs)
        limit = self.settings.request_timeout_s
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return finite_or_refuse(
                    await self._predict(raw_inputs, spec, normalize, explain))
        except TimeoutError:
            if not deadline.expired():  # not ours: someone else's timeout
                raise
            raise RequestTimeoutError(f"no result within {limit:g} s") from None

    async def _predict(self, raw_inputs: Sequence[object], spec: CompositionSpec,
                       normalize: Normalize | None, explain: bool) -> Prediction:
        self.worker.announce_incoming()
        try:
            items = await run_in_threadpool(self._decode_inputs, raw_inputs)
            plan, future = await self._submit(items, spec, normalize, explain, announced=True)
        finally:
            self.worker.withdraw_incoming()
        for replans in range(MAX_REPLANS + 1):
            try:
                logits, contrib = await future
                break
            except reg.NotFoundError:
                # A version this plan pinned was forgotten while the request waited (another
                # replica's DELETE): no response may use it any more. Resolve the composition
                # again — now without it, or a 404 if the request named it — and rerun.
                if replans == MAX_REPLANS:
                    raise
                log.info("pinned version forgotten before it ran; resolving again",
                         extra={"event": "replan", "replan": replans + 1,
                                "generation": plan.generation})
                plan, future = await self._submit(items, spec, normalize, explain)
            except NotStagedError:
                # A cached Δ this job counted on was evicted before it ran: admit it again,
                # bringing every component (app/fetch.py); that job cannot miss again.
                if replans == MAX_REPLANS:
                    raise
                log.info("a cached composition was evicted before the request ran; staging "
                         "its components", extra={"event": "restage", "replan": replans + 1})
                plan, future = await self._submit(items, spec, normalize, explain,
                                                  everything=True)
        self.metrics.inference_items.inc(len(raw_inputs))
        return Prediction(logits, contrib, plan)

    async def _submit(self, items: list[torch.Tensor], spec: CompositionSpec,
                      normalize: Normalize | None, explain: bool, *, announced: bool = False,
                      everything: bool = False) -> tuple[Plan, asyncio.Future[JobResult]]:
        """Resolve, stage the components the device lacks, queue the job. A version
        forgotten between the resolve and its fetch comes back as the future's
        NotFoundError, re-planned like one forgotten in the queue."""
        epoch = self.executor.purges.epoch  # before the resolve (app/purges.py)
        plan = await run_in_threadpool(self.resolve, spec, normalize, explain)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JobResult] = loop.create_future()
        try:
            staged = await self._stage(plan, epoch, announced=announced, everything=everything)
        except reg.NotFoundError as exc:
            future.set_exception(exc)
            return plan, future
        self.worker.submit(Job(items, plan, future, loop, staged))
        return plan, future

    async def _stage(self, plan: Plan, epoch: int, *, announced: bool,
                     everything: bool) -> Staged:
        """Fetch the components the device lacks (none for a warm composition). While it
        waits for storage the request is no job that will "arrive soon" (``announced``: it
        was counted by ``worker.announce_incoming``), so the batcher does not hold batches
        for it."""
        wanted = self.executor.to_stage(plan, everything)
        if not wanted:
            return Staged(epoch)
        if announced:
            self.worker.withdraw_incoming()
        try:
            return await self.fetcher.stage(wanted, epoch)
        finally:
            if announced:
                self.worker.announce_incoming()

    def _check_count(self, raw_inputs: Sequence[object]) -> None:
        limit = self.settings.max_inputs_per_request
        if not raw_inputs:
            raise BadRequestError("inputs is empty: send at least one input")
        if len(raw_inputs) > limit:
            raise BadRequestError(f"{len(raw_inputs)} inputs in one request, over the limit of "
                                  f"{limit}; split the batch")

    def _decode_inputs(self, raw_inputs: Sequence[object]) -> list[torch.Tensor]:
        """One request's inputs as tensors (on a Starlette thread). Encoded images are first
        checked against TMC_MAX_REQUEST_PIXELS from their headers alone, then decoded on the
        bounded decode pool (503 when it is saturated); nothing else enters that pool."""
        pre = self.base.preprocessor
        if not isinstance(pre, ImagePreprocessor):
            return pre.decode_inputs(raw_inputs)
        raw = [_b64(i, v) if isinstance(v, str) else v for i, v in enumerate(raw_inputs)]
        if not any(isinstance(v, bytes) for v in raw):  # nested arrays: nothing to decode
            return pre.decode_inputs(raw)
        pre.check_pixel_budget(raw, self.settings.max_request_pixels, "TMC_MAX_REQUEST_PIXELS")
        return self.decode_pool.run(pre.decode_inputs, raw)

    def resolve(self, spec: CompositionSpec, normalize: Normalize | None,
                explain: bool = False) -> Plan:
        """Pin the composition to one registry generation (runs on a thread)."""
        if isinstance(spec, BaseOnly):  # names nothing in the registry: served even while
            # the shared registry is lost (the generation is then just a label)
            return make_plan([], self.registry.generation(check=False), normalize or "none",
                             explain)
        if isinstance(spec, Explicit):
            resolved = self.registry.resolve_explicit(spec.weights)
        elif isinstance(spec, AllActive):
            resolved = self.registry.resolve_all_active()
        else:
            assert isinstance(spec, Named)
            resolved = self.registry.resolve_named(spec.name)
        self.metrics.generation.set(resolved.generation)
        chosen = normalize or resolved.normalize
        return make_plan(list(resolved.items), resolved.generation, chosen, explain)

    # -- admin -----------------------------------------------------------------------------
    def forget(self, cid: str) -> reg.ForgetReceipt:
        started = time.perf_counter()
        with self._purge_lock:
            self._forgets_in_flight += 1
        try:
            receipt = self.registry.forget(cid)
        except BaseException:
            self._end_forget([])  # still purge what the hook deferred meanwhile
            raise
        self._end_forget(receipt.digests_removed)
        self.metrics.forgets.inc()
        self.metrics.forget_seconds.observe(time.perf_counter() - started)
        self.metrics.generation.set(receipt.generation)
        device = reg.StorePurge("device-cache", self.executor.device.type, "purged")
        return dataclasses.replace(receipt, purged=[*receipt.purged, device])

    def _end_forget(self, digests: list[str]) -> None:
        """A local forget's registry call ended: one purge of its digests and of those the
        hook deferred, before the receipt returns; a purge that fails fails the forget."""
        with self._purge_lock:
            self._forgets_in_flight -= 1
            gone = sorted(self._deferred.union(digests))
            self._deferred.clear()
        if gone:
            self.worker.call(partial(self.executor.purge, gone))

    def _purge_on_forget_event(self, digests: list[str]) -> None:
        """The registry's ``on_forget`` hook: a forget (this replica's or, through the Redis
        event thread, another's) purges the forgotten digests from the device caches.

        While a local forget is inside its registry call, the digests join that call's one
        purge instead: the registry fires this hook for the forget itself (and in Redis mode
        maybe again, for its own change event), and it only logs a failing hook, whereas
        a failed purge must fail the DELETE.
        """
        with self._purge_lock:
            if self._forgets_in_flight:
                self._deferred.update(digests)
                return
        log.info("forget heard from the registry: purging %d digest(s)", len(digests),
                 extra={"event": "purge", "digests": list(digests)})
        self.worker.call(partial(self.executor.purge, digests))

    def _registry_lost_changed(self, reason: str | None, generation: int) -> None:
        """The registry found the shared store lost (``reason``) or intact again (None)."""
        self.metrics.registry_lost.set(0 if reason is None else 1)
        if reason is not None:
            log.warning("%s", reason, extra={"event": "registry_lost",
                                             "generation": generation})
        else:
            log.info("the shared registry is intact again (generation %d): serving "
                     "compositions", generation,
                     extra={"event": "registry_restored", "generation": generation})

    def readiness(self) -> dict[str, object]:
        """Ready = warm, not draining, and the registry index answers. A blob store that
        does not answer (S3 down) is reported (``blob_store``, ``blob_store_error``) but does
        not make the replica unready: every replica shares it, so failing readiness would take
        them all out of service, while base-only requests and compositions whose tensors are
        cached still work; requests that need cold bytes get a 503 that names the store.
        Blocking (an index and a blob store round trip, up to the S3 probe's timeouts when
        the store hangs): routes call it on a thread, never on the event loop."""
        checks: dict[str, object] = {"base_loaded": True, "warm_forward": self.ready,
                                  "draining": self.draining}
        try:
            checks["registry_generation"] = self.registry.generation()
            checks["registry"] = True
        except reg.StorageError as exc:  # unreachable, or lost its data (RegistryLostError)
            checks["registry"] = False
            checks["registry_error"] = str(exc)
        try:
            self.registry.ping_blobs()
            checks["blob_store"] = True
        except reg.StorageError as exc:
            checks["blob_store"] = False
            checks["blob_store_error"] = str(exc)
        checks["ready"] = bool(self.ready and checks["registry"] and not self.draining)
        return checks

    def registry_persistence(self) -> dict[str, object]:
        """Whether every forget this replica made is out of the registry store's disk files:
        the Redis AOF/RDB rewrite state (registry.redis_persistence), or what SQLite does."""
        return persistence_report(self.registry)


def _b64(index: int, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"input {index}: not valid base64 (send a base64-encoded PNG or "
                         "JPEG, or a nested array of pixel values)") from None


def finite_or_refuse(pred: Prediction) -> Prediction:
    """Never answer inf/NaN: even bounded weights can overflow (large Δ values, fp16).
    Only this request is refused (422); its batch-mates ran their own rows."""
    bad = [what for what, t in (("logits", pred.logits), ("contributions", pred.contributions))
           if t is not None and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CompositionError(
            f"the composition's output is not finite ({' and '.join(bad)} overflowed to "
            "inf/NaN): lower the weights, or use components with smaller values")
    return pred
