"""The project's profiles are valid R4 resources, and outputs use only codes they declare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from gateway.translate.build import PROJECT
from tests.conftest import ROOT, available_cases, resources, run_case

PROFILES = ROOT / "profiles"


def _declared() -> dict[str, set[str]]:
    systems: dict[str, set[str]] = {}
    for path in PROFILES.glob("CodeSystem-*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        systems[data["url"]] = {c["code"] for c in data["concept"]}
    return systems


@pytest.mark.parametrize("path", sorted(PROFILES.glob("[A-Z]*.json")), ids=lambda p: p.name)
def test_profile_file_is_valid_r4(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    get_fhir_model_class(data["resourceType"]).model_validate(data)
    assert data["url"].startswith(PROJECT)


def _codings(node: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and "code" in node:
            found.append(node)
        for value in node.values():
            found.extend(_codings(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_codings(value))
    return found


@pytest.mark.parametrize("case", available_cases())
def test_outputs_use_only_declared_project_codes(case: str) -> None:
    declared = _declared()
    for res in resources(run_case(case)):
        for coding in _codings(res):
            if coding["system"].startswith(f"{PROJECT}/CodeSystem/"):
                assert coding["system"] in declared, coding
                assert coding["code"] in declared[coding["system"]], coding
        for ext in res.get("extension", []):
            for part in ext.get("extension", []):
                if part["url"] == "basis":
                    assert part["valueCode"] in declared[f"{PROJECT}/CodeSystem/change-basis"]


@pytest.mark.parametrize("name", ["s1", "s4-fallback", "s5", "s7"])
def test_messages_and_audit_use_only_declared_project_codes(name: str) -> None:
    from tests.dispatch_cases import run

    declared = _declared()
    result = run(name)
    for bundle in (*result.messages.values(), result.audit):
        for coding in _codings(bundle):
            if coding["system"].startswith(f"{PROJECT}/CodeSystem/"):
                assert coding["code"] in declared.get(coding["system"], set()), coding


def test_policy_kinds_are_declared() -> None:
    from gateway.policy import policy_from
    from tests.conftest import mappings

    declared = _declared()[f"{PROJECT}/CodeSystem/actor-kind"]
    assert {k.kind for k in policy_from(mappings()).actor_kinds} | {"care-team", "outside-care-team"} == declared
