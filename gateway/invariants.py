"""The named invariants of ``profiles/invariants.json``, evaluated with a FHIRPath engine (fhirpathpy).

They say what structure alone cannot: every resource labelled, every change-table entry flagged, a
message starting with its header and focused on a Communication it carries.  The tests evaluate them
on every output; ``--strict`` evaluates them before anything leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from fhirpathpy import compile as fhirpath_compile

from gateway.errors import MappingLoadError, Where

__all__ = ["Invariant", "load_invariants", "violations"]


@dataclass(frozen=True, slots=True)
class Invariant:
    key: str
    resource_type: str  # "*" = every resource
    human: str
    expression: str
    evaluate: Callable[..., Any]


def _profiles_dir() -> Path:
    packaged = Path(__file__).parent / "_data" / "profiles"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "profiles"


@cache
def load_invariants() -> tuple[Invariant, ...]:
    path = _profiles_dir() / "invariants.json"
    try:
        data = orjson.loads(path.read_bytes())
        return tuple(
            Invariant(i["key"], i["type"], i["human"], i["expression"], fhirpath_compile(i["expression"]))
            for i in data["invariants"]
        )
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MappingLoadError(f"cannot load invariants: {exc}", where=Where(source=str(path))) from None


def _resources(bundle_or_resource: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    yield bundle_or_resource
    for entry in bundle_or_resource.get("entry", []) if bundle_or_resource.get("resourceType") == "Bundle" else []:
        resource = entry.get("resource")
        if isinstance(resource, Mapping):
            yield resource


def violations(bundle_or_resource: Mapping[str, Any]) -> list[str]:
    """``"<key> <Type>/<id>: <human>"`` for every invariant a resource (or a Bundle and its entries) breaks."""
    found = []
    for resource in _resources(bundle_or_resource):
        rtype = resource.get("resourceType")
        for inv in load_invariants():
            if inv.resource_type not in ("*", rtype):
                continue
            if inv.resource_type == "*" and rtype == "Bundle":
                continue  # Bundles carry no category or narrative of their own
            result = inv.evaluate(dict(resource), {"resource": dict(resource)})
            if result not in ([True], []):  # empty: the rule does not apply (e.g. "implies" on nothing)
                found.append(f"{inv.key} {rtype}/{resource.get('id')}: {inv.human}")
    return found
