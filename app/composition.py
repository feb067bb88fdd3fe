"""What a request asks to compose, and how it becomes a pinned Plan."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from app.errors import BadRequestError
from app.plan import Plan, PlanTerm
from registry import ResolvedItem
from registry.validate import MAX_WEIGHT, WEIGHT_BOUND
from tangent import Normalize, composition_digest, effective_weights


def _bounded(weight: float) -> float:
    if abs(weight) > MAX_WEIGHT:
        raise PydanticCustomError("weight_range", "weight {weight} is out of range: weights "
                                  "must satisfy {bound}", {"weight": f"{weight:g}",
                                                           "bound": WEIGHT_BOUND})
    return weight


# A weight in a JSON body: a JSON number only (no "0.5" string, no true/false), finite and
# bounded by MAX_WEIGHT.
Weight = Annotated[float, Field(strict=True, allow_inf_nan=False), AfterValidator(_bounded)]
# The same bound for a weight in a query string (always text, so not strict).
QueryWeight = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_bounded)]


@dataclass(frozen=True)
class Explicit:
    weights: dict[str, float]


@dataclass(frozen=True)
class AllActive:
    pass


@dataclass(frozen=True)
class Named:
    name: str


@dataclass(frozen=True)
class BaseOnly:
    pass


CompositionSpec = Explicit | AllActive | Named | BaseOnly


def spec_from_fields(components: dict[str, float] | str | None, composition: str | None
                     ) -> CompositionSpec:
    """Native API fields: {"components": {...} | "*"} or {"composition": name}; neither = base."""
    if components is not None and composition is not None:
        raise BadRequestError("give either 'components' or 'composition', not both")
    if composition is not None:
        return Named(composition)
    if components == "*":
        return AllActive()
    if isinstance(components, dict):
        return Explicit(components) if components else BaseOnly()
    if components is None:
        return BaseOnly()
    raise BadRequestError("'components' must be an object {id: weight} or the string \"*\"")


def parse_components_param(text: str) -> CompositionSpec:
    """V2 scalar parameter: "a:0.5,b:0.5", "a" (weight 1), "*" (all active), "" (base)."""
    text = text.strip()
    if text == "*":
        return AllActive()
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        cid, _, raw = part.partition(":")
        try:
            weight = float(raw) if raw else 1.0
        except ValueError:
            raise BadRequestError(f"tmc_components: weight {raw!r} of {cid!r} is not a number; "
                                  "use 'id:weight,id:weight'") from None
        if not math.isfinite(weight):
            raise BadRequestError(f"tmc_components: weight of {cid!r} must be finite")
        if abs(weight) > MAX_WEIGHT:
            raise BadRequestError(f"tmc_components: weight {weight:g} of {cid!r} is out of "
                                  f"range: weights must satisfy {WEIGHT_BOUND}")
        if cid.strip() in weights:
            raise BadRequestError(f"tmc_components: {cid.strip()!r} appears twice")
        weights[cid.strip()] = weight
    return Explicit(weights) if weights else BaseOnly()


def make_plan(items: Sequence[ResolvedItem], generation: int, normalize: Normalize,
              explain: bool) -> Plan:
    """The plan of a registry-resolved composition (``Resolved.items``: id, digest and
    stored or requested weight of each version), normalization applied."""
    eff = effective_weights([float(i.weight) for i in items], normalize)
    terms = tuple(PlanTerm(i.id, i.digest, w) for i, w in zip(items, eff, strict=True))
    key = composition_digest([(t.digest, t.weight) for t in terms], "none") if terms else ""
    return Plan(key, terms, generation, normalize, explain)
