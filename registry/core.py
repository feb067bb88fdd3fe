"""The ``Registry`` facade: the API the service and the CLI use, over an Index + BlobStore.

Forget policy: ``forget(id)`` removes the id from every named composition that names it
(those compositions are rewritten in the same atomic change; the generation moves once),
deletes every version's bytes from the blob store (in the same change when the index holds
them, else right after it, under the digests' mutation lock) and from this process's local
cache, fires the ``on_forget`` hooks, runs the forget stages, and returns a receipt listing
the digests removed, the compositions changed and, in ``purged``, what each store did:
"index", then "blobs" (file/redis/s3, with what was deleted where), then "local-cache"
(shared mode), then each added stage's answer. If a blob delete fails after the index
change, the forget raises StorageError (503) saying which bytes remain where: the id is
already gone from the index, and the next ``sweep`` (every open runs one) deletes the bytes
(registry.blob_eraser).
A resolve that starts after ``forget`` returned never sees the id:
every resolve reads the shared index; nothing about ids is cached in the process.

Shared-digest policy: a version belongs to exactly one id. Adding bytes that are already a
version of another id is refused with ``ConflictError`` (aliases are named compositions),
so forgetting an id always deletes all of its bytes.

Re-adding: identical bytes (and no changed setting) change nothing; new bytes append a
version and make it current; ``weight``/``tags``/``active`` left as None keep the id's
current values (1.0 / none / True for a new id). After a forget, re-adding is a new
registration: nothing about the old one survives.

Crash safety: a blob is written before the index entry that references it; a crash in
between leaves an unreferenced blob that the next open sweeps (``TMC_TEST_CRASH_POINT``).
The sweep checks each orphan's owner again under its mutation lock before deleting it, and
skips one whose lock another process holds (an add in flight: see ``registry.ports``).

Lost-store policy (shared backends): a store that restarted empty or was flushed is not
served as the registry; ``generation()`` and every resolve raise ``RegistryLostError`` (503)
until it is restored. The policy and its detector are in ``registry.lost_store``.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from types import TracebackType

import torch
from safetensors.torch import load as st_load

from registry import ops
from registry.blob_eraser import BlobEraser
from registry.errors import (
    BlobMissingError,
    BusyError,
    InvalidComponentError,
    InvalidRequestError,
    NotFoundError,
    StorageError,
)
from registry.loader import Loader
from registry.local_cache import LocalCache
from registry.lost_store import LostHook, LostStoreGuard
from registry.lost_store import RegistryLostError as RegistryLostError  # its old import path
from registry.ports import BlobStore, Index, Listener, Tx
from registry.records import ComponentSettings, VersionRecord
from registry.types import (
    AddResult,
    ComponentInfo,
    ForgetReceipt,
    NamedComposition,
    Resolved,
    StorePurge,
)
from registry.validate import (
    check_id,
    check_normalize,
    check_tags,
    check_weight,
    check_weights,
)
from registry.watch import Watch
from tangent import ComponentError, Normalize, TangentParam, decode_component

CRASH_ENV = "TMC_TEST_CRASH_POINT"
BLOB_ATTEMPTS = 5


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process here when ``TMC_TEST_CRASH_POINT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# Run after a forget's index change, before its receipt returns: purges what one store still
# holds of the removed digests and says what it did (the receipt lists every stage's answer).
ForgetStage = Callable[[builtins.list[str]], StorePurge]


class Registry:
    """Components, versions and named compositions of one base, over one storage backend."""

    def __init__(self, index: Index, blobs: BlobStore, *, base_fingerprint: str,
                 region: Mapping[str, TangentParam], max_component_bytes: int,
                 cache: LocalCache | None = None, backend: str = "custom",
                 listen: bool = True, blob_kind: str = "custom",
                 blob_where: str = "the blob store") -> None:
        self.base_fingerprint = base_fingerprint
        self.region = dict(region)
        self.max_component_bytes = max_component_bytes
        self.backend = backend
        self.blob_kind, self.blob_where = blob_kind, blob_where  # "s3", "s3://bucket/prefix"
        self._index, self._blobs, self._cache = index, blobs, cache
        self._watch = Watch()
        self._loader = Loader(index, blobs, cache, self._watch, blob_where)
        self._eraser = BlobEraser(blobs, index_holds_blobs=index.holds_blobs, kind=blob_kind,
                                  where=blob_where)
        marks = getattr(index, "marks", None)  # shared stores only: see registry.lost_store
        self._guard = LostStoreGuard(marks, base_fingerprint) if marks is not None else None
        self._forget_stages: builtins.list[ForgetStage] = []
        self.accept_current()
        self.sweep()
        self._listener: Listener | None = index.listen(self._loader.on_event) if listen else None

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._index.close()
        self._blobs.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def ping(self) -> None:
        """Raise StorageError unless the index and the blob store (if it can tell) answer."""
        self._index.ping()
        self.ping_blobs()

    def ping_blobs(self) -> None:
        """Raise StorageError unless the blob store answers (S3: the bucket; a store that
        cannot tell is taken as answering)."""
        ping: Callable[[], None] | None = getattr(self._blobs, "ping", None)
        if ping is not None:
            ping()

    def sweep(self) -> list[str]:
        """Delete blobs no id owns (a crashed add's, a failed forget delete's) and stale
        local cache entries; returns the digests deleted from the blob store."""
        with self._index.mutation_lock():
            self._blobs.discard_partial()
            candidates = builtins.list(self._blobs.digests())
        orphans = self._index.read(partial(ops.unreferenced, digests=candidates))
        removed = [d for d in orphans if self._drop_orphan(d)]
        self._loader.sweep_cache()
        return removed

    def _drop_orphan(self, digest: str) -> bool:
        """Delete ``digest``'s bytes if still no id owns them; skip it if an add or forget
        elsewhere holds its lock (that one decides; the next sweep looks again)."""
        try:
            with self._index.mutation_lock([digest], wait=False):
                dropped = self._index.mutate(partial(ops.drop_orphans, candidates=[digest]),
                                             then=self._eraser.after_commit)
                return bool(dropped)
        except BusyError:
            return False

    # -- components ------------------------------------------------------------------

    def add(self, id: str, data: bytes, weight: float | None = None,
            tags: Iterable[str] | None = None, active: bool | None = None) -> AddResult:
        """Register ``data`` as the current version of ``id`` (nothing stored on error).

        None settings keep the id's current values (1.0 / no tags / active for a new id).
        """
        cid = check_id(id)
        settings = ComponentSettings.checked(weight, tags, active)
        version = self._validate(data)
        with self._index.mutation_lock([version.digest]):
            result = self._add_locked(cid, version, settings, data)
        self._watch.changed(result.generation)
        return result

    def _validate(self, data: bytes) -> VersionRecord:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidRequestError(f"component body must be bytes, got {type(data).__name__}")
        try:
            comp = decode_component(bytes(data), self.base_fingerprint, self.region,
                                    self.max_component_bytes)
        except ComponentError as exc:
            raise InvalidComponentError(str(exc), exc) from exc
        return VersionRecord.checked(comp.digest, time.time(), comp.nbytes, comp.metadata)

    def _add_locked(self, cid: str, version: VersionRecord, settings: ComponentSettings,
                    data: bytes) -> AddResult:
        for _ in range(BLOB_ATTEMPTS):
            self._index.read(partial(ops.check_owner, cid=cid, digest=version.digest))
            if not self._blobs.exists(version.digest):
                self._blobs.put(version.digest, bytes(data))
            crash_point("after_blob")
            try:
                return self._index.mutate(
                    partial(ops.add, cid=cid, version=version, settings=settings))
            except BlobMissingError:
                continue  # a concurrent sweep removed the fresh blob: write it again
        raise StorageError(f"could not store the bytes of {cid!r}: they kept disappearing")

    def get(self, id: str) -> ComponentInfo:
        cid = check_id(id)
        rec = self._index.read(lambda tx: tx.component(cid))
        if rec is None:
            raise NotFoundError(f"no component {cid!r}")
        return rec.info()

    def update(self, id: str, *, weight: float | None = None,
               tags: Iterable[str] | None = None, active: bool | None = None) -> int:
        """Change settings atomically; returns the generation after the change."""
        cid = check_id(id)
        settings = ComponentSettings.checked(weight, tags, active)
        generation = self._index.mutate(partial(ops.update, cid=cid, settings=settings))
        self._watch.changed(generation)
        return generation

    def reweight(self, id: str, weight: float) -> int:
        return self.update(id, weight=check_weight(weight))

    def set_tags(self, id: str, tags: Iterable[str]) -> int:
        return self.update(id, tags=check_tags(tags))

    def set_active(self, id: str, active: bool) -> int:
        if not isinstance(active, bool):
            raise InvalidRequestError(f"active must be true or false, got {active!r}")
        return self.update(id, active=active)

    def add_forget_stage(self, stage: ForgetStage) -> None:
        """Run ``stage(digests)`` after every forget's index change; its StorePurge joins
        the receipt. A stage that raises fails the forget (the index change stands)."""
        self._forget_stages.append(stage)

    def forget(self, id: str) -> ForgetReceipt:
        """Exactly forget ``id``: see the module docstring for what that guarantees."""
        cid = check_id(id)
        for _ in range(BLOB_ATTEMPTS):
            digests = self._index.read(partial(ops.versions, cid=cid))
            try:
                with self._index.mutation_lock(digests):
                    receipt, blobs = self._forget_locked(cid, digests)
                break
            except ops.VersionsChanged:
                continue  # a version was added meanwhile: lock it too
        else:
            raise StorageError(f"could not forget {cid!r}: versions kept being added to it")
        purged = [StorePurge("index", self.backend, "purged"), blobs]
        if self._cache is not None:
            purged.append(self._cache.purge_record(receipt.digests_removed))
        purged += [stage(receipt.digests_removed) for stage in self._forget_stages]
        return dataclasses.replace(receipt, purged=purged)

    def _forget_locked(self, cid: str, digests: builtins.list[str]
                       ) -> tuple[ForgetReceipt, StorePurge]:
        """The index change, then (right after its commit) the bytes and this process's
        caches; under the digests' mutation lock."""
        blobs: builtins.list[StorePurge] = []

        def after_commit(receipt: ForgetReceipt) -> None:
            self._watch.changed(receipt.generation)
            crash_point("after_forget_index")
            try:
                blobs.append(self._eraser.after_forget(cid, receipt.digests_removed))
            finally:  # the id is gone from the index: purge this process anyway
                self._loader.purge(receipt.digests_removed, own=True)

        receipt = self._index.mutate(partial(ops.forget, cid=cid, locked=digests),
                                     then=after_commit)
        return receipt, blobs[0]

    # -- bytes and tensors -----------------------------------------------------------

    def load_bytes(self, digest: str) -> bytes:
        """The verified bytes of a version the index still references (else NotFoundError)."""
        return self._loader.load(digest)

    def load_tensors(self, digest: str) -> dict[str, torch.Tensor]:
        """The tensors of a version, parsed from its verified bytes."""
        return dict(st_load(self._loader.load(digest)))

    # -- reads -----------------------------------------------------------------------

    def generation(self, *, check: bool = True) -> int:
        """The current generation; with ``check``, RegistryLostError if the store lost its
        data (see registry.lost_store)."""
        if check and self._guard is not None:
            return self._guard.check()
        return self._index.read(lambda tx: tx.generation())

    # -- lost-store detection (registry.lost_store) -----------------------------------------

    def on_lost(self, hook: LostHook) -> None:
        """Call ``hook(reason, generation)`` when the store is found lost (``reason`` says
        why) and ``hook(None, generation)`` when it is intact again (shared stores only)."""
        if self._guard is not None:
            self._guard.on_lost(hook)

    @property
    def lost(self) -> str | None:
        """Why the store is considered lost (None: intact, as far as last checked)."""
        return None if self._guard is None else self._guard.lost

    def accept_current(self) -> int:
        """Accept the store as it is now (e.g. a deliberately fresh registry): claim it for
        this base if its base key is gone, and forget the highest generation seen. Returns
        the current generation."""
        self._index.mutate(partial(ops.claim_base, fingerprint=self.base_fingerprint))
        generation = self._index.read(lambda tx: tx.generation())
        if self._guard is not None:
            self._guard.accept(generation)
            self._guard.check()
        return generation

    def count(self) -> int:
        """How many components are registered, without reading any record (``/metrics``)."""
        return self._index.read(ops.count_components)

    def list(self, tag: str | None = None, active: bool | None = None
             ) -> builtins.list[ComponentInfo]:
        """Components sorted by id, optionally only those with ``tag`` / that ``active``."""
        records = self._index.read(lambda tx: tx.components(None))
        return [r.info() for _, r in sorted(records.items())
                if (tag is None or tag in r.tags) and (active is None or r.active == active)]

    # -- named compositions ----------------------------------------------------------

    def put_composition(self, name: str, weights: Mapping[str, float],
                        normalize: Normalize = "none",
                        expected_generation: int | None = None) -> NamedComposition:
        """Create or replace a composition; with ``expected_generation`` only if it is still
        at that generation (0: only if absent). Every id it names must exist."""
        norm = check_normalize(normalize)
        comp = NamedComposition(check_id(name, "composition name"),
                                check_weights(weights, norm), norm, 0)
        if expected_generation is not None and (
                isinstance(expected_generation, bool) or not isinstance(expected_generation, int)
                or expected_generation < 0):
            raise InvalidRequestError(
                f"expected_generation must be a non-negative integer, got {expected_generation!r}")
        stored = self._index.mutate(partial(
            ops.put_composition, comp=comp, expected_generation=expected_generation))
        self._watch.changed(stored.generation)
        return stored

    def get_composition(self, name: str) -> NamedComposition:
        cname = check_id(name, "composition name")
        comp = self._index.read(lambda tx: tx.composition(cname))
        if comp is None:
            raise NotFoundError(f"no composition {cname!r}")
        return comp

    def delete_composition(self, name: str) -> int:
        cname = check_id(name, "composition name")
        generation = self._index.mutate(partial(ops.delete_composition, name=cname))
        self._watch.changed(generation)
        return generation

    def list_compositions(self) -> builtins.list[NamedComposition]:
        comps = self._index.read(lambda tx: tx.compositions())
        return [c for _, c in sorted(comps.items())]

    # -- resolution: each reads one snapshot, so all items share one generation ---------

    def resolve_explicit(self, weights: Mapping[str, float],
                         normalize: Normalize = "none") -> Resolved:
        """These ids at these weights (inactive ids included: they were asked for)."""
        norm = check_normalize(normalize)
        checked = check_weights(weights, norm)
        return self._resolved(partial(ops.resolve_explicit, weights=checked, normalize=norm))

    def resolve_all_active(self, normalize: Normalize = "none") -> Resolved:
        """Every active component at its registry weight (``"*"``)."""
        norm = check_normalize(normalize)
        return self._resolved(partial(ops.resolve_active, normalize=norm))

    def resolve_named(self, name: str) -> Resolved:
        cname = check_id(name, "composition name")
        return self._resolved(partial(ops.resolve_named, name=cname))

    def _resolved(self, fn: Callable[[Tx], Resolved]) -> Resolved:
        floor = self._guard.floor() if self._guard is not None else 0  # before the read
        try:
            resolved = self._index.read(fn)
        except NotFoundError:
            self.refresh()  # an id may be missing because another process forgot it
            raise          # (or because the store lost its data: RegistryLostError first)
        if self._guard is not None:
            self._guard.check(resolved.generation, floor)
        self._loader.reconcile(resolved.generation)
        return resolved

    # -- change notification ---------------------------------------------------------

    def on_forget(self, hook: Callable[[builtins.list[str]], None]) -> None:
        """Call ``hook(digests)`` when versions this process loaded (or forgot) are gone."""
        self._watch.on_forget(hook)

    def on_change(self, hook: Callable[[int], None]) -> None:
        """Call ``hook(generation)`` when this process notices a newer generation."""
        self._watch.on_change(hook)

    def refresh(self) -> int:
        """Check the generation now and purge whatever another process forgot."""
        generation = self.generation()
        self._loader.reconcile(generation)
        return generation
