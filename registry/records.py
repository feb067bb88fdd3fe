"""Stored records (what the index keeps per id and per composition) and their JSON form.

Both backends store the same JSON documents, so the state transitions below are written
once and run inside each backend's atomic unit (SQLite transaction, Redis MULTI/EXEC).

A record is kept in two parts: the ``ComponentHead`` (id, weight, active, current digest),
which is all resolution reads, and the rest (tags, created, every version with its
metadata), read only by ``get``/``list`` and by changes. So resolving costs the same however
long an id's history is and however much metadata (bounded: ``check_metadata``) it carries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from registry.errors import InvalidRequestError, StorageError
from registry.types import ComponentInfo, NamedComposition
from registry.validate import check_metadata, check_normalize, check_tags, check_weight


@dataclass(frozen=True)
class VersionRecord:
    """One immutable version: content-addressed by the sha256 of its bytes."""

    digest: str
    created: float
    nbytes: int
    metadata: dict[str, str]

    @classmethod
    def checked(cls, digest: str, created: float, nbytes: int,
                metadata: Mapping[str, str]) -> VersionRecord:
        """A new version whose metadata is within the bounds (else InvalidComponentError)."""
        return cls(digest, created, nbytes, check_metadata(metadata))


@dataclass(frozen=True)
class ComponentHead:
    """What resolution reads of an id: no tags, no version history, no metadata."""

    id: str
    weight: float
    active: bool
    current: str


@dataclass(frozen=True)
class ComponentSettings:
    """Mutable settings of an id; None leaves the current value (or the default) alone."""

    weight: float | None = None
    tags: tuple[str, ...] | None = None
    active: bool | None = None

    @classmethod
    def checked(cls, weight: object, tags: Iterable[str] | None,
                active: object) -> ComponentSettings:
        if active is not None and not isinstance(active, bool):
            raise InvalidRequestError(f"active must be true or false, got {active!r}")
        return cls(None if weight is None else check_weight(weight),
                   None if tags is None else check_tags(tags), active)


@dataclass(frozen=True)
class ComponentRecord:
    id: str
    weight: float
    tags: tuple[str, ...]
    active: bool
    created: float
    current: str
    versions: tuple[VersionRecord, ...]

    def head(self) -> ComponentHead:
        return ComponentHead(self.id, self.weight, self.active, self.current)

    def version(self, digest: str) -> VersionRecord:
        return next(v for v in self.versions if v.digest == digest)

    def digests(self) -> list[str]:
        return [v.digest for v in self.versions]

    def info(self) -> ComponentInfo:
        cur = self.version(self.current)
        return ComponentInfo(
            id=self.id, digest=self.current, versions=self.digests(), weight=self.weight,
            tags=list(self.tags), active=self.active, created=self.created, nbytes=cur.nbytes,
            metadata=dict(cur.metadata))


def new_record(cid: str, version: VersionRecord, settings: ComponentSettings) -> ComponentRecord:
    return ComponentRecord(
        id=cid, weight=1.0 if settings.weight is None else settings.weight,
        tags=settings.tags or (), active=True if settings.active is None else settings.active,
        created=version.created, current=version.digest, versions=(version,))


def apply_settings(rec: ComponentRecord, settings: ComponentSettings) -> ComponentRecord:
    return replace(
        rec,
        weight=rec.weight if settings.weight is None else settings.weight,
        tags=rec.tags if settings.tags is None else settings.tags,
        active=rec.active if settings.active is None else settings.active)


def apply_add(old: ComponentRecord | None, cid: str, version: VersionRecord,
              settings: ComponentSettings) -> tuple[ComponentRecord, bool]:
    """The record after adding ``version``, and whether it is a new version of the id.

    Bytes that are already a version of the id make that version current again (no copy).
    """
    if old is None:
        return new_record(cid, version, settings), True
    known = version.digest in old.digests()
    versions = old.versions if known else (*old.versions, version)
    rec = replace(old, current=version.digest, versions=versions)
    return apply_settings(rec, settings), not known


def _version_doc(v: VersionRecord) -> dict[str, Any]:
    return {"digest": v.digest, "created": v.created, "nbytes": v.nbytes,
            "metadata": v.metadata}


def _version(v: Any) -> VersionRecord:
    return VersionRecord(str(v["digest"]), float(v["created"]), int(v["nbytes"]),
                         {str(k): str(x) for k, x in v["metadata"].items()})


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _corrupt(exc: Exception) -> StorageError:
    return StorageError(f"corrupt component record in the index: {exc}")


def component_to_json(rec: ComponentRecord) -> str:
    """The whole record as one document (the layout before heads and details were split)."""
    return _dumps({
        "id": rec.id, "weight": rec.weight, "tags": list(rec.tags), "active": rec.active,
        "created": rec.created, "current": rec.current,
        "versions": [_version_doc(v) for v in rec.versions]})


def component_from_json(text: str | bytes) -> ComponentRecord:
    """A whole-record document: ``component_to_json``'s, or a head merged with its detail."""
    try:
        doc = json.loads(text)
        return ComponentRecord(
            id=str(doc["id"]), weight=float(doc["weight"]),
            tags=tuple(str(t) for t in doc["tags"]), active=bool(doc["active"]),
            created=float(doc["created"]), current=str(doc["current"]),
            versions=tuple(_version(v) for v in doc["versions"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(exc) from exc


def head_to_json(rec: ComponentRecord) -> str:
    return _dumps({"id": rec.id, "weight": rec.weight, "active": rec.active,
                   "current": rec.current})


def head_from_json(text: str | bytes) -> ComponentHead:
    """The head of a head document (or of a whole-record document written before the split)."""
    try:
        doc = json.loads(text)
        return ComponentHead(str(doc["id"]), float(doc["weight"]), bool(doc["active"]),
                             str(doc["current"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(exc) from exc


def detail_to_json(rec: ComponentRecord) -> str:
    """Everything but the head: tags, created, and every version with its metadata."""
    return _dumps({"tags": list(rec.tags), "created": rec.created,
                   "versions": [_version_doc(v) for v in rec.versions]})


def component_from_parts(head: str | bytes, detail: str | bytes | None) -> ComponentRecord:
    """The record from its head and detail documents; ``detail`` None: ``head`` is a
    whole-record document written before the split."""
    if detail is None:
        return component_from_json(head)
    try:
        doc = json.loads(head)
        if "versions" in doc:  # written as a whole record (by an older process): it wins
            return component_from_json(head)
        doc.update(json.loads(detail))
    except (ValueError, TypeError, AttributeError) as exc:
        raise _corrupt(exc) from exc
    return component_from_json(json.dumps(doc))


def is_whole_record(text: str | bytes) -> bool:
    """Whether a stored head document is a whole record (the layout before the split)."""
    try:
        return "versions" in json.loads(text)
    except (ValueError, TypeError) as exc:
        raise _corrupt(exc) from exc


def composition_to_json(comp: NamedComposition) -> str:
    doc: dict[str, Any] = {"name": comp.name, "weights": comp.weights,
                           "normalize": comp.normalize, "generation": comp.generation}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def composition_from_json(text: str | bytes) -> NamedComposition:
    try:
        doc = json.loads(text)
        weights = {str(k): float(w) for k, w in doc["weights"].items()}
        return NamedComposition(str(doc["name"]), weights, check_normalize(doc["normalize"]),
                                int(doc["generation"]))
    except (ValueError, KeyError, TypeError, AttributeError, InvalidRequestError) as exc:
        raise StorageError(f"corrupt composition record in the index: {exc}") from exc
