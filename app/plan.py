"""A resolved composition, fixed at admission: what the device worker will compute."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanTerm:
    id: str
    digest: str  # the component version's sha256
    weight: float  # effective weight, normalization already applied


@dataclass(frozen=True)
class Plan:
    """The composition of one request, pinned to one registry generation."""

    # tangent.composition_digest of the effective (digest, weight) terms: the composed Δ's
    # cache key and the digest reported to clients; "" for the base alone
    composition_digest: str
    terms: tuple[PlanTerm, ...]
    generation: int
    normalize: str = "none"
    explain: bool = False

    @property
    def group_key(self) -> str:
        """Requests with equal group keys share one forward pass."""
        return (f"{self.composition_digest}:explain" if self.explain
                else self.composition_digest)

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(t.digest for t in self.terms)
