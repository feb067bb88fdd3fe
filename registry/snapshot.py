"""An in-memory, read-only ``Tx`` over a whole-index snapshot.

The Redis backend falls back to it when optimistic reads keep losing to writers: one Lua
call copies the index (metadata only, never bytes) atomically, then the read runs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from registry.records import ComponentHead, ComponentRecord
from registry.types import NamedComposition


@dataclass(frozen=True)
class SnapshotTx:
    gen: int
    records: dict[str, ComponentRecord]
    comps: dict[str, NamedComposition]

    def generation(self) -> int:
        return self.gen

    def base_fingerprint(self) -> str | None:
        raise NotImplementedError("a snapshot holds what reads need, not the base")

    def component(self, cid: str) -> ComponentRecord | None:
        return self.records.get(cid)

    def components(self, ids: Sequence[str] | None) -> dict[str, ComponentRecord]:
        wanted = self.records.keys() if ids is None else ids
        return {i: self.records[i] for i in wanted if i in self.records}

    def heads(self, ids: Sequence[str] | None) -> dict[str, ComponentHead]:
        return {i: r.head() for i, r in self.components(ids).items()}

    def count_components(self) -> int:
        return len(self.records)

    def owner(self, digest: str) -> str | None:
        return next((r.id for r in self.records.values() if digest in r.digests()), None)

    def composition(self, name: str) -> NamedComposition | None:
        return self.comps.get(name)

    def compositions(self) -> dict[str, NamedComposition]:
        return dict(self.comps)

    def _read_only(self, *args: object) -> None:
        raise TypeError("a snapshot is read-only")

    put_component = delete_component = set_owner = delete_owner = _read_only
    put_composition = delete_composition = set_generation = _read_only
    set_base_fingerprint = require_blob = drop_blob = publish = _read_only
