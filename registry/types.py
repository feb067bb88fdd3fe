"""Public value types returned by the registry: frozen, JSON-friendly dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tangent import Normalize

JsonObject = dict[str, object]  # a JSON object as the registry answers it (str keys, JSON values)


class _JsonMixin:
    def to_dict(self) -> JsonObject:
        """A plain ``dict`` of JSON types (lists, dicts, str, int, float, bool)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class ComponentInfo(_JsonMixin):
    """A component as registered: its current version and its settings."""

    id: str
    digest: str  # sha256 of the current version's bytes
    versions: list[str]  # every version's digest, oldest first
    weight: float
    tags: list[str]
    active: bool
    created: float  # unix time of the first registration of this id
    nbytes: int  # size of the current version
    metadata: dict[str, str]  # the current version's safetensors metadata


@dataclass(frozen=True)
class AddResult(_JsonMixin):
    id: str
    digest: str
    generation: int
    created_version: bool  # False when these bytes were already a version of this id


@dataclass(frozen=True)
class StorePurge(_JsonMixin):
    """What a forget did to one store that held the id's records or bytes.

    ``state``: "purged" (nothing of the id is left there), "rewriting" (the live store is
    purged; its persistence files are being rewritten — ``check`` says how to tell when
    that is done), "failed" (the rewrite failed or was refused: the old files may still hold
    the data; ``detail`` says what to do), "not-persisted" (the store keeps no files), or
    "unknown" (the store does not let us tell; ``detail`` says why).
    """

    store: str  # "index", "blobs", "local-cache", "device-cache", "redis-persistence"
    kind: str  # the backend: "sqlite", "redis", "file", "s3", "memory", "aof+rdb", ...
    state: str
    detail: str = ""
    check: str = ""  # how a client can check a "rewriting" state later


@dataclass(frozen=True)
class ForgetReceipt(_JsonMixin):
    id: str
    digests_removed: list[str]
    compositions_changed: list[str]  # named compositions the id was removed from
    generation: int
    purged: list[StorePurge] = dataclasses.field(default_factory=list)  # each store, in order


@dataclass(frozen=True)
class NamedComposition(_JsonMixin):
    name: str
    weights: dict[str, float]
    normalize: Normalize
    generation: int  # registry generation at which this composition was last written


@dataclass(frozen=True)
class ResolvedItem(_JsonMixin):
    id: str
    digest: str
    weight: float


@dataclass(frozen=True)
class Resolved(_JsonMixin):
    """A composition pinned to one registry generation; items sorted by id."""

    generation: int
    items: list[ResolvedItem]
    normalize: Normalize
