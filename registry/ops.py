"""Every registry change and snapshot read, written once over the ``Tx`` port.

Each function runs inside one atomic unit (``Index.mutate`` / ``Index.read``): it reads
first, then stages its writes, so both backends apply it all-or-nothing. The generation
moves exactly when the state changes, and each change publishes one event message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from registry.errors import ConflictError, NotFoundError, RegistryError
from registry.ports import Tx
from registry.records import (
    ComponentRecord,
    ComponentSettings,
    VersionRecord,
    apply_add,
    apply_settings,
)
from registry.types import AddResult, ForgetReceipt, NamedComposition, Resolved, ResolvedItem
from registry.validate import check_composable
from tangent import Normalize


class VersionsChanged(RegistryError):
    """Internal: a forget found versions it holds no lock for (added meanwhile); re-run it
    holding them too."""


def event(generation: int, forgotten: Sequence[str] = ()) -> str:
    return json.dumps({"generation": generation, "forgotten": list(forgotten)})


def _commit(tx: Tx, generation: int, forgotten: Sequence[str] = ()) -> None:
    tx.set_generation(generation)
    tx.publish(event(generation, forgotten))


def _existing(tx: Tx, cid: str) -> ComponentRecord:
    rec = tx.component(cid)
    if rec is None:
        raise NotFoundError(f"no component {cid!r}")
    return rec


def claim_base(tx: Tx, fingerprint: str) -> None:
    """Bind an empty store to this base; refuse a store that belongs to another base."""
    current = tx.base_fingerprint()
    if current is None:
        tx.set_base_fingerprint(fingerprint)
    elif current != fingerprint:
        raise ConflictError(
            f"this registry holds components of base {current[:16]}…, "
            f"not of the configured base {fingerprint[:16]}…; use another registry")


def check_owner(tx: Tx, cid: str, digest: str) -> None:
    owner = tx.owner(digest)
    if owner is not None and owner != cid:
        raise ConflictError(
            f"these bytes (version {digest[:16]}…) are already registered as component "
            f"{owner!r}; a version belongs to one id (use a named composition as an alias)")


def add(tx: Tx, cid: str, version: VersionRecord, settings: ComponentSettings) -> AddResult:
    tx.require_blob(version.digest)
    check_owner(tx, cid, version.digest)
    old = tx.component(cid)
    rec, created_version = apply_add(old, cid, version, settings)
    generation = tx.generation()
    if rec == old:
        return AddResult(cid, version.digest, generation, False)
    tx.put_component(rec)
    tx.set_owner(version.digest, cid)
    _commit(tx, generation + 1)
    return AddResult(cid, version.digest, generation + 1, created_version)


def update(tx: Tx, cid: str, settings: ComponentSettings) -> int:
    old = _existing(tx, cid)
    rec = apply_settings(old, settings)
    generation = tx.generation()
    if rec == old:
        return generation
    tx.put_component(rec)
    _commit(tx, generation + 1)
    return generation + 1


def versions(tx: Tx, cid: str) -> list[str]:
    """Every version digest of ``cid`` (NotFoundError if unknown)."""
    return _existing(tx, cid).digests()


def forget(tx: Tx, cid: str, locked: Sequence[str]) -> ForgetReceipt:
    """Remove the id, every version's owner entry and bytes, and the id from compositions.

    ``locked``: the digests whose mutation lock the caller holds; a version outside them
    (added since the caller looked) raises VersionsChanged, changing nothing."""
    rec = _existing(tx, cid)
    if set(rec.digests()) - set(locked):
        raise VersionsChanged(f"{cid!r} gained versions while being forgotten")
    comps = tx.compositions()
    generation = tx.generation() + 1
    changed = sorted(name for name, comp in comps.items() if cid in comp.weights)
    for name in changed:
        weights = {i: w for i, w in comps[name].weights.items() if i != cid}
        tx.put_composition(NamedComposition(name, weights, comps[name].normalize, generation))
    digests = rec.digests()
    for digest in digests:
        tx.delete_owner(digest)
        tx.drop_blob(digest)
    tx.delete_component(cid)
    _commit(tx, generation, digests)
    return ForgetReceipt(cid, digests, changed, generation)


def put_composition(tx: Tx, comp: NamedComposition,
                    expected_generation: int | None) -> NamedComposition:
    current = tx.composition(comp.name)
    actual = 0 if current is None else current.generation
    if expected_generation is not None and expected_generation != actual:
        raise ConflictError(
            f"composition {comp.name!r} is at generation {actual}, not {expected_generation} "
            "(0 means absent): it changed; read it again and retry")
    missing = sorted(set(comp.weights) - set(tx.heads(list(comp.weights))))
    if missing:
        raise ConflictError(f"composition {comp.name!r} names unknown component(s) {missing}")
    if current is not None and (current.weights, current.normalize) == (
            comp.weights, comp.normalize):
        return current
    generation = tx.generation() + 1
    stored = NamedComposition(comp.name, dict(comp.weights), comp.normalize, generation)
    tx.put_composition(stored)
    _commit(tx, generation)
    return stored


def delete_composition(tx: Tx, name: str) -> int:
    if tx.composition(name) is None:
        raise NotFoundError(f"no composition {name!r}")
    tx.delete_composition(name)
    generation = tx.generation() + 1
    _commit(tx, generation)
    return generation


def drop_orphans(tx: Tx, candidates: Sequence[str]) -> list[str]:
    """Stage the deletion of every candidate blob that no id owns (a crashed add's, or a
    forget's whose delete failed)."""
    orphans = unreferenced(tx, candidates)
    for digest in orphans:
        tx.drop_blob(digest)
    return orphans


def unreferenced(tx: Tx, digests: Sequence[str]) -> list[str]:
    """The digests that no id owns."""
    return [d for d in digests if tx.owner(d) is None]


def _resolved(tx: Tx, weights: Mapping[str, float], normalize: Normalize,
              what: str) -> Resolved:
    """Resolution reads heads only: its cost is independent of history and metadata."""
    heads = tx.heads(sorted(weights))
    missing = sorted(set(weights) - set(heads))
    if missing:
        raise NotFoundError(f"{what} names unknown component(s) {missing}")
    items = [ResolvedItem(i, heads[i].current, weights[i]) for i in sorted(weights)]
    return Resolved(tx.generation(), items, normalize)


def resolve_explicit(tx: Tx, weights: Mapping[str, float], normalize: Normalize) -> Resolved:
    return _resolved(tx, weights, normalize, "the composition")


def resolve_named(tx: Tx, name: str) -> Resolved:
    comp = tx.composition(name)
    if comp is None:
        raise NotFoundError(f"no composition {name!r}")
    return _resolved(tx, comp.weights, comp.normalize, f"composition {name!r}")


def resolve_active(tx: Tx, normalize: Normalize) -> Resolved:
    heads = tx.heads(None)
    items = [ResolvedItem(i, h.current, h.weight) for i, h in sorted(heads.items()) if h.active]
    check_composable([item.weight for item in items], normalize)
    return Resolved(tx.generation(), items, normalize)


def count_components(tx: Tx) -> int:
    return tx.count_components()
