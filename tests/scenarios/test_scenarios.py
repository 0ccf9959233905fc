"""Seeds scenarios S1, S2, S4, S5, S6, S7 (reference/seeds-digest.md §7) through gateway dispatch.

Expected outcomes: tests/fixtures/dispatch/README.md.  Each test states the scenario's point.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FIXTURES, ROOT
from tests.dispatch_cases import run

CARE = {"medical", "social", "logistics"}


def _types(message: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in message["entry"]:
        counts[entry["resource"]["resourceType"]] = counts.get(entry["resource"]["resourceType"], 0) + 1
    return counts


def _activities(message: dict[str, Any]) -> list[str]:
    plans = [e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "CarePlan"]
    return [a["detail"]["description"] for p in plans for a in p["activity"]]


def _drugs(message: dict[str, Any]) -> list[str]:
    return [
        e["resource"]["medicationCodeableConcept"].get("text", "")
        for e in message["entry"]
        if e["resource"]["resourceType"] == "MedicationStatement"
    ]


def test_s1_each_actor_gets_its_own_view() -> None:
    result = run("s1-pharmacy")
    gp = result.messages["PractitionerRole-gp-roussel"]
    assert _types(gp)["MedicationStatement"] == 7 and _types(gp)["List"] == 1
    comm = gp["entry"][1]["resource"]
    assert any(p["id"] == "change-table" for p in comm["payload"]), "the GP gets the change table"
    assert result.decisions["PractitionerRole-ide-benoit"].categories == CARE
    pharmacist = result.decisions["PractitionerRole-pharm-lemaire"]
    assert pharmacist.categories == {"medical", "logistics"}, "pharmacist: the change table, no social data"
    assert "List" in _types(result.messages["PractitionerRole-pharm-lemaire"])
    saad = result.messages["Organization-saad-tilleuls"]
    assert "MedicationStatement" not in _types(saad) and "List" not in _types(saad)
    assert [a.split(":")[0] for a in _activities(saad)] == ["Aide à domicile "], "the SAAD sees its own tasks only"
    assert {p["id"] for p in saad["entry"][1]["resource"]["payload"]} >= {"return-home", "contacts"}
    assert result.decisions["Organization-saad-tilleuls"].consents == ("Consent/s1-aide-domicile/_history/1",)
    ccas = result.messages["Organization-ccas-paris13"]
    assert [a.split(" (")[0] for a in _activities(ccas)] == ["Portage de repas"], (
        "the meal service gets its task (diet rule)"
    )


def test_s2_consent_changes_over_time_and_the_tutor_consents() -> None:
    for instant in ("s2-t1", "s2-t2", "s2-t3", "s2-t4"):
        assert run(instant).decisions["PractitionerRole-gp-perrin"].categories == CARE
    t1, t2, t3, t4 = (run(n) for n in ("s2-t1", "s2-t2", "s2-t3", "s2-t4"))
    for recipient in ("Organization-saad-bel-age", "Organization-clic-glaciere"):
        assert recipient not in t1.messages and recipient not in t2.messages
        assert t1.decisions[recipient].by_category["logistics"].consent == "Consent/s2-refus-2018/_history/1"
        assert t2.decisions[recipient].by_category["logistics"].rule == "policy:consent-required"
        assert any(b.consent == "Consent/s2-refus-2018/_history/2" for b in t2.decisions[recipient].ignored)
        assert t3.decisions[recipient].categories == {"logistics", "social"}
        assert t3.decisions[recipient].consents == ("Consent/s2-tutrice-2019-07/_history/1",)
        assert t4.decisions[recipient].categories == {"logistics", "social"}, "the patient's own consent is not valid"
        assert any(b.rule == "consent:invalid-performer" for b in t4.decisions[recipient].ignored)
    saad_tasks = _activities(t3.messages["Organization-saad-bel-age"])
    assert len(saad_tasks) == 1 and "incontinence" in saad_tasks[0], "borderline rule: the SAAD gets its hygiene task"
    assert "Organization-saad-tilleuls" not in t3.decisions, "the former SAAD is no longer routed"


def test_s4_no_gp_is_an_audited_exception_never_a_success(tmp_path: Path) -> None:
    result = run("s4")
    assert not result.complete
    assert {e.kind for e in result.routing.events} == {"no-gp", "unreachable"}
    events = [e["resource"] for e in result.audit["entry"] if len(e["resource"]["subtype"]) > 1]
    assert {e["subtype"][1]["code"] for e in events if e["outcome"] == "4"} == {"no-gp", "unreachable"}
    assert "PractitionerRole-ide-leclerc" not in result.messages
    fallback = run("s4-fallback")
    assert "PractitionerRole-suivi-post-hospit" in fallback.messages
    assert [e.kind for e in fallback.routing.events].count("fallback") == 2
    assert not fallback.complete, "a fallback is still reported"
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "dispatch",
            str(FIXTURES / "dispatch" / "ldl-ses-s4-no-gp.xml"),
            "--directory",
            str(FIXTURES / "dispatch" / "directory.json"),
            "--consents",
            str(FIXTURES / "dispatch" / "consents-s4.json"),
            "--out",
            str(out),
            "--at",
            "2026-11-04T11:00:00+01:00",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    assert "no-gp" in proc.stderr and "INCOMPLETE" in proc.stderr
    assert (out / "audit.json").exists() and (out / "PractitionerRole-pharm-lemaire.json").exists()


def test_s5_access_follows_the_role_not_the_dac() -> None:
    result = run("s5")
    physician = result.messages["PractitionerRole-dac-dr-morel"]
    referente = result.messages["PractitionerRole-dac-ass-nguyen"]
    assert any("AOTAL" in d for d in _drugs(physician)), "the DAC physician receives the medical content"
    assert not any("AOTAL" in d for d in _drugs(referente)), "the addiction treatment (ETH) stays out"
    text = str(referente).lower()
    assert "alcool" not in text and "addictolog" not in text
    assert result.decisions["PractitionerRole-dac-ass-nguyen"].kind == "social-worker"
    assert result.decisions["PractitionerRole-dac-dr-morel"].kind == "physician"
    assert "Organization-dac-paris-sud" not in result.messages, "no consent names the DAC inbox"
    for social in ("Organization-ccas-paris13", "Organization-saad-tilleuls"):
        assert "medical" not in result.decisions[social].categories
        assert not _drugs(result.messages[social])


def test_s6_objection_applies_at_send_time_and_its_extension_later() -> None:
    at_letter = run("s6-t1")
    assert at_letter.decisions["PractitionerRole-gp-perrin"].categories == CARE
    assert any("SERTRALINE" in d.upper() for d in _drugs(at_letter.messages["PractitionerRole-gp-perrin"]))
    for recipient in ("PractitionerRole-clic-ass-fabre", "Organization-saad-tilleuls"):
        assert recipient not in at_letter.messages
        assert at_letter.decisions[recipient].by_category["logistics"].consent == "Consent/s6-opposition/_history/1"
        assert at_letter.views[recipient].withheld, "the audit proves what was not sent"
    later = run("s6-t2")
    assert later.decisions["Organization-saad-tilleuls"].categories == {"logistics"}
    assert later.decisions["Organization-saad-tilleuls"].consents == ("Consent/s6-opposition/_history/2",)
    assert "PractitionerRole-clic-ass-fabre" not in later.messages


def test_s7_every_participant_informed_with_its_own_segment() -> None:
    result = run("s7")
    assert [e.kind for e in result.routing.events] == ["unresolved"], "the physiotherapist is reported"
    for recipient in ("Organization-saad-bel-age", "Organization-ccas-paris13"):
        message = result.messages[recipient]
        team = next(e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == "CareTeam")
        assert len(team["participant"]) >= 5, "each sees who else is involved"
        assert len(_activities(message)) == 1, "but only its own segment"
        assert not _drugs(message)
    dac = result.decisions["Organization-dac-paris-sud"]
    assert "medical" in dac.categories and "PSY" not in dac.sensitive
    assert not any("MIANSERINE" in d.upper() for d in _drugs(result.messages["Organization-dac-paris-sud"]))
