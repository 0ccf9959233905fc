"""Real-world CI-SIS quirks (standards.md §A) are tolerated and reported, never silently guessed."""

from __future__ import annotations

from tests.conftest import resources, run_case


def _by_type(case: str, resource_type: str) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in resources(run_case(case)) if r["resourceType"] == resource_type]


def test_reference_without_hash_is_resolved_and_reported() -> None:
    result = run_case("ldl-ses-s1-2022")
    bisoprolol = next(m for m in result.translation.letter.medications if m.name.startswith("BISOPROLOL"))
    assert bisoprolol.narrative.cells, "the row pointed to by 'sortie-2' (no '#') was not found"
    assert any("lacks '#'" in i.text for i in result.issues)


def test_reused_entry_ids_do_not_merge_lines() -> None:
    result = run_case("ldl-ses-s1-2022")
    letter = result.translation.letter
    keys = [m.key for m in letter.medications]
    assert len(keys) == len(set(keys))
    statements = _by_type("ldl-ses-s1-2022", "MedicationStatement")
    assert len(statements) == len(letter.medications)


def test_time_without_zone_is_assumed_and_reported() -> None:
    result = run_case("ldl-ses-s1-2022")
    assert any("no time zone" in i.text and "Europe/Paris" in i.text for i in result.issues)
    outcome = _by_type("ldl-ses-s1-2022", "OperationOutcome")[0]
    assert any("no time zone" in i["diagnostics"] for i in outcome["issue"])


def test_mistyped_devices_template_is_still_read() -> None:
    devices = _by_type("ldl-ses-s1-2022", "Device")
    assert devices, "the devices section with templateId 2.16.840.1.11383.10.20.1.7 was not read"


def test_provisional_or_final_status_reaches_the_document_reference() -> None:
    docref = _by_type("ldl-ses-s1-2022", "DocumentReference")[0]
    assert docref["docStatus"] in ("preliminary", "final")


def test_stopped_reason_stays_on_its_row() -> None:
    result = run_case("ldl-ses-s1-2022+ees")
    rows = {c.line.name: c for c in result.translation.built.changes}
    ibuprofen = next(c for name, c in rows.items() if name.startswith("IBUPROFENE"))
    assert ibuprofen.status.value == "stopped" and ibuprofen.basis.value == "stated"
    assert ibuprofen.reason and "insuffisance rénale" in ibuprofen.reason
    forxiga = next(c for name, c in rows.items() if name.startswith("FORXIGA"))
    assert forxiga.status.value == "initiated"
    assert forxiga.reason and "insuffisance cardiaque" in forxiga.reason


def test_innovative_drug_keeps_its_explanation() -> None:
    """S8: the GP must get the reason and monitoring instructions of the drug new to them."""
    result = run_case("ldl-ses-s8-2020")
    leqvio = next(c for c in result.translation.built.changes if c.line.name.startswith("LEQVIO"))
    assert leqvio.status.value == "unknown"  # no admission list: never guessed
    assert leqvio.reason and len(leqvio.reason) > 80
    with_vsm = run_case("ldl-ses-s8-2020+vsm")
    leqvio = next(c for c in with_vsm.translation.built.changes if c.line.name.startswith("LEQVIO"))
    assert leqvio.status.value == "initiated" and leqvio.reason


def test_expected_s1_statuses_with_the_entry_letter() -> None:
    result = run_case("ldl-ses-s1-2022+ees")
    statuses = {c.line.name.split()[0]: (c.status.value, c.basis.value) for c in result.translation.built.changes}
    assert statuses == {
        "FUROSEMIDE": ("modified", "derived"),
        "BISOPROLOL": ("continued", "derived"),
        "FORXIGA": ("initiated", "derived"),
        "ATORVASTATINE": ("equivalence", "derived"),
        "KARDEGIC": ("modified", "derived"),
        "IBUPROFENE": ("stopped", "stated"),
        "IMOVANE": ("stopped", "derived"),
    }


def test_fhir_document_and_cda_give_the_same_change_table() -> None:
    cda = run_case("ldl-ses-s1-2022+ees").translation.built.changes
    fhir = run_case("fhir-document-s1+ees").translation.built.changes
    assert [(c.line.name.split()[0], c.status) for c in cda] == [(c.line.name.split()[0], c.status) for c in fhir]


def test_unstructured_letter_is_forwarded_not_refused() -> None:
    """A CI-SIS level-1 letter (PDF in nonXMLBody) still reaches the GP, with a clear warning."""
    import base64

    from fhir.resources.R4B import get_fhir_model_class
    from lxml import etree

    from gateway.pipeline import translate_letter
    from gateway.settings import Settings
    from tests.conftest import FIXTURES, mappings

    root = etree.fromstring((FIXTURES / "cda" / "ldl-ses-s8-2020.xml").read_bytes())
    ns = "{urn:hl7-org:v3}"
    component = root.find(f"{ns}component")
    assert component is not None
    for child in list(component):
        component.remove(child)
    body = etree.SubElement(component, f"{ns}nonXMLBody")
    text = etree.SubElement(body, f"{ns}text", mediaType="application/pdf", representation="B64")
    pdf = b"%PDF-1.4 lettre de liaison\n%%EOF"
    text.text = base64.b64encode(pdf).decode()
    result = translate_letter(etree.tostring(root), name="n1.xml", mappings=mappings(), settings=Settings())
    resources = [e["resource"] for e in result.bundle["entry"]]
    docref = next(r for r in resources if r["resourceType"] == "DocumentReference")
    assert [c["attachment"]["contentType"] for c in docref["content"]][1] == "application/pdf"
    assert base64.b64decode(docref["content"][1]["attachment"]["data"]) == pdf
    assert any("unstructured document" in i.text for i in result.issues)
    assert not any(r["resourceType"] == "MedicationStatement" for r in resources)
    comm = next(r for r in resources if r["resourceType"] == "Communication")
    assert comm["recipient"], "the GP is still addressed"
    for res in resources:
        get_fhir_model_class(res["resourceType"]).model_validate(res)
