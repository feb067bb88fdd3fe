"""The Redis key layout of a shared registry, and ``RedisTx``: the index's transaction view.

Key layout (``P`` is the key prefix, ``tmc:`` by default; one Redis database per base):

    P gen               string   the registry generation (INCRements with every change)
    P base              string   the base fingerprint this registry belongs to
    P ids               set      every registered component id
    P c:<id>            string   the component's head (JSON: id, weight, active, current):
                                 all that resolution reads, whatever the history/metadata
    P detail:<id>       string   the rest of its record (JSON: tags, created, every version
                                 with its metadata); read by get/list and by changes only
    P schema            string   "2" once whole-record ``c:<id>`` documents (schema 1) are split
    P owner:<digest>    string   the id that owns a version digest (a digest has one owner)
    P blob:<digest>     string   the component bytes of that version (bytes in Redis only)
    P lease:<digest>    string   a token: who may write/delete that digest's bytes now
                                 (bytes elsewhere only; expires after LEASE_TTL_S)
    P comps             hash     composition name -> composition record (JSON)
    P events            channel  pub/sub: one JSON message per change {"generation", "forgotten"}

A ``RedisTx`` reads immediately on a pipeline that WATCHes ``P gen`` and stages every write
for the MULTI/EXEC that ``RedisIndex`` (registry.redis_backend) runs; keys are built from
validated ids and hex digests only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.client import Pipeline

from registry.errors import BlobMissingError
from registry.records import (
    ComponentHead,
    ComponentRecord,
    component_from_json,
    component_from_parts,
    composition_from_json,
    composition_to_json,
    detail_to_json,
    head_from_json,
    head_to_json,
    is_whole_record,
)
from registry.types import NamedComposition
from registry.validate import DIGEST_PATTERN

SCHEMA_VERSION = 2
Op = Callable[[Pipeline], object]  # one staged write, replayed inside MULTI/EXEC


@dataclass(frozen=True)
class Keys:
    prefix: str = "tmc:"

    def __getattr__(self, name: str) -> str:  # gen, base, ids, comps, events
        if name.startswith("_"):
            raise AttributeError(name)
        return self.prefix + name

    def component(self, cid: str) -> str:
        return f"{self.prefix}c:{cid}"

    def detail(self, cid: str) -> str:
        return f"{self.prefix}detail:{cid}"

    def owner(self, digest: str) -> str:
        return f"{self.prefix}owner:{digest}"

    def blob(self, digest: str) -> str:
        """The key of a digest's bytes; the digest is checked first (ValueError), so no key is
        ever built from anything but 64 lowercase hex characters."""
        if not DIGEST_PATTERN.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return f"{self.prefix}blob:{digest}"

    def blob_pattern(self) -> str:
        """The SCAN pattern of every blob key."""
        return f"{self.prefix}blob:*"

    def lease(self, digest: str) -> str:
        return f"{self.prefix}lease:{digest}"


class RedisTx:
    """A ``Tx``: immediate reads on a watching pipeline, writes staged for MULTI/EXEC."""

    def __init__(self, pipe: Pipeline, keys: Keys, holds_blobs: bool = True) -> None:
        self._p = pipe
        self._k = keys
        self._holds_blobs = holds_blobs
        self.ops: list[Op] = []
        self._details: dict[str, str] = {}  # detail documents read: unchanged ones aren't rewritten

    def generation(self) -> int:
        return int(self._p.get(self._k.gen) or 0)

    def base_fingerprint(self) -> str | None:
        value = self._p.get(self._k.base)
        return None if value is None else text(value)

    def component(self, cid: str) -> ComponentRecord | None:
        return self.components([cid]).get(cid)

    def _ids(self, ids: Sequence[str] | None) -> list[str]:
        if ids is None:
            return sorted(text(i) for i in self._p.smembers(self._k.ids))
        return list(ids)

    def components(self, ids: Sequence[str] | None) -> dict[str, ComponentRecord]:
        wanted = self._ids(ids)
        if not wanted:
            return {}
        texts = self._p.mget([self._k.component(i) for i in wanted]
                             + [self._k.detail(i) for i in wanted])
        records = {}
        for cid, head, detail in zip(wanted, texts, texts[len(wanted):], strict=False):
            if head is not None:
                if detail is not None:
                    self._details[cid] = text(detail)
                records[cid] = component_from_parts(head, detail)
        return records

    def heads(self, ids: Sequence[str] | None) -> dict[str, ComponentHead]:
        wanted = self._ids(ids)
        texts = self._p.mget([self._k.component(i) for i in wanted]) if wanted else []
        heads = [head_from_json(t) for t in texts if t is not None]
        return {h.id: h for h in heads}

    def count_components(self) -> int:
        return int(self._p.scard(self._k.ids))

    def owner(self, digest: str) -> str | None:
        value = self._p.get(self._k.owner(digest))
        return None if value is None else text(value)

    def composition(self, name: str) -> NamedComposition | None:
        text = self._p.hget(self._k.comps, name)
        return None if text is None else composition_from_json(text)

    def compositions(self) -> dict[str, NamedComposition]:
        texts = self._p.hvals(self._k.comps)
        comps = [composition_from_json(t) for t in texts]
        return {c.name: c for c in comps}

    def _stage(self, op: Op) -> None:
        self.ops.append(op)

    def put_component(self, rec: ComponentRecord) -> None:
        head, detail = head_to_json(rec), detail_to_json(rec)
        self._stage(lambda p: p.set(self._k.component(rec.id), head))
        if self._details.get(rec.id) != detail:
            self._stage(lambda p: p.set(self._k.detail(rec.id), detail))
        self._stage(lambda p: p.sadd(self._k.ids, rec.id))

    def delete_component(self, cid: str) -> None:
        self._stage(lambda p: p.delete(self._k.component(cid), self._k.detail(cid)))
        self._stage(lambda p: p.srem(self._k.ids, cid))

    def split_whole_records(self) -> None:
        """Schema 1 → 2: rewrite whole-record ``c:<id>`` documents as head + detail."""
        if self._p.get(self._k.schema) is not None:
            return
        ids = self._ids(None)
        for text in self._p.mget([self._k.component(i) for i in ids]) if ids else []:
            if text is not None and is_whole_record(text):
                self.put_component(component_from_json(text))
        self._stage(lambda p: p.set(self._k.schema, SCHEMA_VERSION))

    def set_owner(self, digest: str, cid: str) -> None:
        self._stage(lambda p: p.set(self._k.owner(digest), cid))

    def delete_owner(self, digest: str) -> None:
        self._stage(lambda p: p.delete(self._k.owner(digest)))

    def put_composition(self, comp: NamedComposition) -> None:
        text = composition_to_json(comp)
        self._stage(lambda p: p.hset(self._k.comps, comp.name, text))

    def delete_composition(self, name: str) -> None:
        self._stage(lambda p: p.hdel(self._k.comps, name))

    def set_generation(self, generation: int) -> None:
        self._stage(lambda p: p.set(self._k.gen, generation))

    def set_base_fingerprint(self, fingerprint: str) -> None:
        self._stage(lambda p: p.set(self._k.base, fingerprint))

    def require_blob(self, digest: str) -> None:
        if not self._holds_blobs:
            return  # written under this digest's lease, which this EXEC checks
        # watched: a sweep deleting the blob from now on aborts this unit's EXEC
        self._p.watch(self._k.blob(digest))  # type: ignore[no-untyped-call]
        if not self._p.exists(self._k.blob(digest)):
            raise BlobMissingError(f"blob {digest} vanished before its index entry was written")

    def drop_blob(self, digest: str) -> None:
        if self._holds_blobs:  # else the core deletes them after the EXEC, under the lease
            self._stage(lambda p: p.delete(self._k.blob(digest)))

    def publish(self, message: str) -> None:
        self._stage(lambda p: p.publish(self._k.events, message))


def text(value: bytes | str) -> str:
    """A Redis reply as str (clients without decode_responses answer bytes)."""
    return value.decode() if isinstance(value, bytes) else value
