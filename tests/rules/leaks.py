"""An independent leak detector for dispatched messages (deliberately not reusing gateway.redact).

It looks at what a recipient would actually receive and reports anything its decision does not
allow: a resource or element of a category it may not see, a sensitivity code it was not granted,
and — for a recipient without medical rights — any clinical resource type, drug name or code of
this letter, or diagnosis word anywhere in the text (narratives and attachments included).
"""

from __future__ import annotations

import base64
import re
from typing import Any

from gateway.consent import Decision
from gateway.label import categories_of, inline_category
from gateway.model import Letter
from gateway.text import fold

CATEGORY = "https://fhir.discharge-gateway.fr/CodeSystem/data-category"
SENSITIVITY = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CLINICAL_TYPES = {
    "MedicationStatement",
    "MedicationRequest",
    "Medication",
    "List",
    "Observation",
    "AllergyIntolerance",
    "Condition",
    "Procedure",
    "DocumentReference",
    "Device",
    "DeviceUseStatement",
    "DiagnosticReport",
    "OperationOutcome",
}
DIAGNOSES = [
    "insuffisance cardiaque",
    "decompensation",
    "depression",
    "depressif",
    "alcool",
    "ethylique",
    "demence",
    "alzheimer",
    "diabete",
    "cancer",
    "infarctus",
    "schizophren",
    "cognitif",
    "mmse",
    "psychiatr",
    "addiction",
    "stimulateur",
    "pacemaker",
    "insuffisance renale",
    "hemorragi",
]
GENERIC_WORDS = {
    "comprime",
    "comprimes",
    "secable",
    "pellicule",
    "solution",
    "buvable",
    "sachet",
    "poudre",
    "injectable",
    "seringue",
    "preremplie",
    "gelule",
    "conseil",
    "biogaran",
    "sandoz",
    "mylan",
    "arrow",
    "teva",
    "viatris",
    "zentiva",
    "cristers",
    "almus",
    "ratiopharm",
    "sachets",
    "enfant",
    "adulte",
}


def _texts(node: Any) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if (
                key == "data"
                and isinstance(value, str)
                and node.get("contentType") in ("application/xhtml+xml", "text/plain", "text/html")
            ):
                out.append(base64.b64decode(value).decode("utf-8", "replace"))
            elif key == "div" and isinstance(value, str):
                out.append(re.sub(r"<[^>]+>", " ", value))
            elif key not in ("system", "reference", "url"):
                out.extend(_texts(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(_texts(item))
    elif isinstance(node, str):
        out.append(node)
    return out


def drug_markers(letter: Letter) -> set[str]:
    markers: set[str] = set()
    for line in letter.medications:
        for word in fold(line.name).split():
            if len(word) >= 5 and not word.isdigit() and word not in GENERIC_WORDS:
                markers.add(word)
        for coding in line.product.codings:
            if len(coding.code) >= 5:
                markers.add(fold(coding.code))
    return markers


def leaks(message: dict[str, Any], decision: Decision, letter: Letter) -> list[str]:
    """Everything in this message the decision does not allow (empty list: no leak)."""
    found: list[str] = []
    allowed = decision.categories
    markers = drug_markers(letter)
    for entry in message["entry"][1:]:
        res = entry["resource"]
        name = f"{res['resourceType']}/{res['id']}"
        cats = categories_of(res, CATEGORY)
        if not cats:
            found.append(f"{name}: no data category")
        if cats - allowed:
            found.append(f"{name}: category {sorted(cats - allowed)} not allowed")
        sens = {c["code"] for c in res.get("meta", {}).get("security", []) if c.get("system") == SENSITIVITY}
        if sens - decision.sensitive:
            found.append(f"{name}: sensitivity {sorted(sens - decision.sensitive)} not allowed")
        elements = res.get("activity", []) if res["resourceType"] == "CarePlan" else res.get("payload", [])
        for element in elements if res["resourceType"] in ("CarePlan", "Communication") else []:
            inline = inline_category(element, CATEGORY)
            if inline not in allowed:
                found.append(f"{name}#{element.get('id')}: element category {inline} not allowed")
        if "medical" in allowed:
            continue
        if res["resourceType"] in CLINICAL_TYPES:
            found.append(f"{name}: clinical resource sent without medical rights")
        text = fold(" ".join(_texts(res)))
        for marker in markers:
            if re.search(rf"\b{re.escape(marker)}\b", text):
                found.append(f"{name}: names the drug or code {marker!r}")
        for word in DIAGNOSES:
            if word in text:
                found.append(f"{name}: mentions {word!r}")
    return found
