"""Letters we have not seen: random damage to real-shaped letters never crashes the gateway.

Each example removes elements, blanks or garbles attributes and text of a fixture letter, then
translates it.  The only acceptable outcomes are a typed GatewayError (with its OperationOutcome) or a
Bundle whose every resource is valid FHIR R4 for the fhir.resources R4B models.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway.errors import GatewayError
from gateway.pipeline import translate_letter
from gateway.settings import Settings
from tests.conftest import FIXTURES, mappings

LETTERS = [
    (FIXTURES / "cda" / "ldl-ses-s1-2022.xml").read_bytes(),
    (FIXTURES / "cda" / "ldl-ses-s8-2020.xml").read_bytes(),
]
GARBAGE = [
    "",
    " ",
    "NI",
    "2020-13-45",
    "20261345",
    "99999999999999",
    "abc",
    "#",
    "#nowhere",
    "-1",
    "1e999",
    "<script>alert(1)</script>",
    "0",
    "\u00e9\u00e8",
    "urn:oid:",
    "1.2.3",
    "12,5",
    "NaN",
]


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    root = etree.fromstring(draw(st.sampled_from(LETTERS)))
    elements = [e for e in root.iter() if isinstance(e.tag, str)]
    for _ in range(draw(st.integers(1, 12))):
        target = elements[draw(st.integers(0, len(elements) - 1))]
        action = draw(st.sampled_from(["remove", "attr", "text", "null", "dup"]))
        parent = target.getparent()
        if action == "remove" and parent is not None:
            parent.remove(target)
        elif action == "attr" and target.attrib:
            name = draw(st.sampled_from(sorted(target.attrib)))
            target.set(name, draw(st.sampled_from(GARBAGE)))
        elif action == "text":
            target.text = draw(st.sampled_from(GARBAGE))
        elif action == "null":
            target.set("nullFlavor", "UNK")
        elif action == "dup" and parent is not None:
            parent.append(etree.fromstring(etree.tostring(target)))
        elements = [e for e in root.iter() if isinstance(e.tag, str)]
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def _invalid(resource: dict[str, Any]) -> str | None:
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except Exception as exc:  # the message names the element
        return f"{resource['resourceType']}: {exc}"
    return None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_damaged_letters_are_refused_cleanly_or_translated_validly(raw: bytes) -> None:
    try:
        result = translate_letter(raw, name="damaged.xml", mappings=mappings(), settings=Settings())
    except GatewayError as error:
        outcome = error.to_operation_outcome()
        assert outcome["issue"][0]["code"] == error.issue_code
        return
    problems = [p for p in (_invalid(e["resource"]) for e in result.bundle["entry"]) if p]
    assert problems == []
