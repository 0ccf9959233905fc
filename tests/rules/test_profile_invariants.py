"""The named FHIRPath invariants of profiles/invariants.json hold on every output, and can fail."""

from __future__ import annotations

import copy

import pytest

from gateway.invariants import load_invariants, violations
from tests.conftest import available_cases, run_case
from tests.dispatch_cases import SCENARIOS, run


@pytest.mark.parametrize("case", available_cases())
def test_translations_meet_the_invariants(case: str) -> None:
    assert violations(run_case(case).bundle) == []


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_messages_meet_the_invariants(name: str) -> None:
    for message in run(name).messages.values():
        assert violations(message) == []


def test_each_kind_of_break_is_caught() -> None:
    message = copy.deepcopy(next(iter(run("s1").messages.values())))
    message["entry"].append(message["entry"].pop(0))  # MessageHeader no longer first
    plan = next(e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "CarePlan")
    plan["activity"][0]["extension"] = []  # unlabelled activity
    statement = next(e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "MedicationStatement")
    statement["meta"]["security"] = []  # unlabelled resource
    lst = next(e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "List")
    lst["entry"][0].pop("flag")
    patient = next(e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "Patient")
    patient.pop("text")  # no narrative
    comm = next(e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "Communication")
    comm.pop("recipient")
    comm.pop("category")
    keys = {v.split()[0] for v in violations(message)}
    assert {"gw-msg-1", "gw-label-2", "gw-label-1", "gw-med-1", "gw-text-1", "gw-comm-1"} <= keys


def test_invariants_load() -> None:
    assert len(load_invariants()) >= 10
