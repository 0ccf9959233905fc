"""FHIR R4 adapter: a document Bundle (Composition first), or a List / collection of prior medication.

The Composition's sections are matched by LOINC code against ``mappings/fhir/sections.yaml`` and
read into the same neutral :class:`~gateway.model.Letter` as a CDA letter, so both give the same
output for the same content.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.errors import IngestError, MissingIdentity, Where
from gateway.mappings import DocumentKind, Mappings
from gateway.model import (
    Address,
    Allergy,
    Code,
    Concept,
    Device,
    Dose,
    Ident,
    Issue,
    Letter,
    MedicationLine,
    MedSection,
    Name,
    Narrative,
    Observation,
    Organization,
    Patient,
    PlanItem,
    Practitioner,
    Ratio,
    RelatedPerson,
    RelationKind,
    SectionText,
    Stay,
    Telecom,
    Timepoint,
    Timing,
)
from gateway.translate.cda_types import text_of
from gateway.translate.registry import SECTION_TRANSLATORS

__all__ = ["read_fhir_document", "read_fhir_list"]

Json = Mapping[str, Any]


class _Index:
    """Resolve references inside one Bundle (fullUrl, Type/id, #contained)."""

    def __init__(self, entries: list[Json], contained: list[Json] | None = None) -> None:
        self.by_ref: dict[str, Json] = {}
        for entry in entries:
            res = entry.get("resource") if "resource" in entry else entry
            if not isinstance(res, Mapping):
                continue
            if entry.get("fullUrl"):
                self.by_ref[str(entry["fullUrl"])] = res
            if res.get("id"):
                self.by_ref[f"{res.get('resourceType')}/{res['id']}"] = res
        for res in contained or []:
            if res.get("id"):
                self.by_ref[f"#{res['id']}"] = res

    def get(self, ref: Json | None) -> Json | None:
        if not ref or not isinstance(ref, Mapping):
            return None
        target = ref.get("reference")
        if not isinstance(target, str):
            return None
        if target in self.by_ref:
            return self.by_ref[target]
        tail = "/".join(target.rstrip("/").split("/")[-2:])
        return self.by_ref.get(tail)


def _concept(value: Any) -> Concept:
    if not isinstance(value, Mapping):
        return Concept()
    codings = tuple(
        Code(str(c["system"]), str(c["code"]), c.get("display"))
        for c in value.get("coding", [])
        if isinstance(c, Mapping) and c.get("system") and c.get("code")
    )
    return Concept(codings, value.get("text") or next((c.display for c in codings if c.display), None))


def _ident(value: Json) -> Ident | None:
    if not value.get("value"):
        return None
    type_code = next((c.get("code") for c in value.get("type", {}).get("coding", [])), None)
    return Ident(str(value.get("system") or "urn:ietf:rfc:3986"), str(value["value"]), type_code, value.get("use"))


def _idents(values: Any) -> tuple[Ident, ...]:
    out = [_ident(v) for v in values or [] if isinstance(v, Mapping)]
    return tuple(i for i in out if i is not None)


def _name(value: Json) -> Name:
    return Name(
        str(value.get("use") or "usual"),
        value.get("family"),
        tuple(value.get("given", [])),
        tuple(value.get("prefix", [])),
        None if value.get("family") or value.get("given") else value.get("text"),
    )


def _telecoms(values: Any) -> tuple[Telecom, ...]:
    return tuple(
        Telecom(str(v.get("system") or "other"), str(v["value"]), v.get("use"))
        for v in values or []
        if isinstance(v, Mapping) and v.get("value")
    )


def _addresses(values: Any) -> tuple[Address, ...]:
    return tuple(
        Address(tuple(v.get("line", [])), v.get("city"), v.get("postalCode"), v.get("country"), v.get("use"))
        for v in values or []
        if isinstance(v, Mapping)
    )


def _time(value: Any) -> Timepoint | None:
    return Timepoint(str(value)) if isinstance(value, str) and value else None


def _decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value)) if isinstance(value, int | float | str) and not isinstance(value, bool) else None
    except InvalidOperation:
        return None


def _dose(value: Any) -> Dose | None:
    if not isinstance(value, Mapping):
        return None
    number = _decimal(value.get("value"))
    if number is None:
        return None
    unit = value.get("code") or value.get("unit")
    text = f"{value.get('value')} {value['unit']}" if value.get("unit") and value.get("unit") != unit else None
    return Dose(number, unit, text)


def _organization(res: Json | None) -> Organization | None:
    if not res or res.get("resourceType") != "Organization":
        return None
    types = res.get("type") or [{}]
    return Organization(
        _idents(res.get("identifier")),
        res.get("name"),
        _concept(types[0]),
        _telecoms(res.get("telecom")),
        _addresses(res.get("address")),
    )


def _practitioner(res: Json | None, index: _Index) -> Practitioner | None:
    if not res:
        return None
    if res.get("resourceType") == "PractitionerRole":
        person = index.get(res.get("practitioner")) or {}
        codes = res.get("code") or [{}]
        names = person.get("name") or []
        return Practitioner(
            _idents(person.get("identifier")),
            _name(names[0]) if names else None,
            _concept(codes[0]),
            _telecoms(res.get("telecom") or person.get("telecom")),
            _addresses(person.get("address")),
            _organization(index.get(res.get("organization"))),
        )
    if res.get("resourceType") == "Practitioner":
        names = res.get("name") or []
        return Practitioner(
            _idents(res.get("identifier")),
            _name(names[0]) if names else None,
            Concept(),
            _telecoms(res.get("telecom")),
            _addresses(res.get("address")),
        )
    return None


def _who(ref: Json | None, index: _Index) -> Practitioner | Organization | None:
    res = index.get(ref)
    if res is None:
        display = ref.get("display") if isinstance(ref, Mapping) else None
        return Organization(name=display) if display else None
    if res.get("resourceType") == "Organization":
        return _organization(res)
    return _practitioner(res, index)


def _patient(res: Json | None, where: Where) -> Patient:
    if not res or res.get("resourceType") != "Patient":
        raise MissingIdentity("the document has no Patient (Composition.subject)", where=where)
    ids = _idents(res.get("identifier"))
    if not ids:
        raise MissingIdentity("the Patient has no identifier (no INS, no IPP)", where=where)
    return Patient(
        ids,
        tuple(_name(n) for n in res.get("name", []) if isinstance(n, Mapping)),
        res.get("gender"),
        res.get("birthDate"),
        _telecoms(res.get("telecom")),
        _addresses(res.get("address")),
    )


_UNITS_FR = {
    "s": ("seconde", "secondes"),
    "min": ("minute", "minutes"),
    "h": ("heure", "heures"),
    "d": ("jour", "jours"),
    "wk": ("semaine", "semaines"),
    "mo": ("mois", "mois"),
    "a": ("an", "ans"),
}


def _timing_text(repeat: Json) -> str | None:
    period, unit = repeat.get("period"), repeat.get("periodUnit")
    if period is None or unit not in _UNITS_FR:
        return None
    one, many = _UNITS_FR[str(unit)]
    frequency = repeat.get("frequency") or 1
    if period == 1:
        return f"{frequency} fois par {one}"
    return f"{frequency} fois toutes les {period} {many}"


def _medication(res: Json, which: MedSection, key: str, index: _Index) -> MedicationLine | None:
    if res.get("resourceType") not in ("MedicationStatement", "MedicationRequest"):
        return None
    product = _concept(res.get("medicationCodeableConcept"))
    if not product:
        med = index.get(res.get("medicationReference")) or {}
        product = _concept(med.get("code"))
    name = product.text or ""
    dosages = res.get("dosage") or res.get("dosageInstruction") or [{}]
    dosage = dosages[0] if isinstance(dosages[0], Mapping) else {}
    rate = (dosage.get("doseAndRate") or [{}])[0]
    dose = _dose(rate.get("doseQuantity"))
    dose_high = None
    if dose is None and isinstance(rate.get("doseRange"), Mapping):
        dose, dose_high = _dose(rate["doseRange"].get("low")), _dose(rate["doseRange"].get("high"))
    repeat = (dosage.get("timing") or {}).get("repeat") or {}
    timing = None
    if repeat:
        timing = Timing(
            _decimal(repeat.get("period")),
            repeat.get("periodUnit"),
            repeat.get("frequency"),
            tuple(repeat.get("when", [])),
            (dosage.get("timing") or {}).get("code", {}).get("text") or _timing_text(repeat),
        )
    period = res.get("effectivePeriod") or {}
    notes = [str(n["text"]) for n in res.get("note", []) if isinstance(n, Mapping) and n.get("text")]
    reasons = [str(r["text"]) for r in res.get("statusReason", []) if isinstance(r, Mapping) and r.get("text")]
    comment = " / ".join(dict.fromkeys([*reasons, *notes])) or None
    max_dose = dosage.get("maxDosePerPeriod")
    ratio = None
    if isinstance(max_dose, Mapping):
        num, den = _dose(max_dose.get("numerator")), _dose(max_dose.get("denominator"))
        ratio = Ratio(num, den) if num and den else None
    reason_codes = res.get("reasonCode") or [{}]
    return MedicationLine(
        section=which,
        key=key,
        product=product,
        name=name or "médicament",
        dose=dose,
        dose_high=dose_high,
        timing=timing,
        route=_concept(dosage.get("route")),
        start=_time(period.get("start") or res.get("effectiveDateTime")),
        end=_time(period.get("end")),
        max_dose=ratio,
        comment=comment,
        instructions=dosage.get("patientInstruction"),
        narrative=Narrative((("posologie", str(dosage["text"])),), str(dosage["text"]))
        if dosage.get("text")
        else Narrative(),
        indication=_concept(reason_codes[0]),
    )


def _div_text(div: Any) -> str:
    if not isinstance(div, str) or not div:
        return ""
    from lxml import etree, html

    try:
        fragment = html.fragment_fromstring(div, create_parent="div")
    except (etree.ParserError, ValueError):
        return ""
    for bad in fragment.iter("script", "style"):
        bad.drop_tree()
    return text_of(fragment)


def read_fhir_document(bundle: Json, kind: DocumentKind, mappings: Mappings, source: str) -> Letter:
    where = Where(source=source)
    entries = [e for e in bundle.get("entry", []) if isinstance(e, Mapping)]
    if not entries or not isinstance(entries[0].get("resource"), Mapping):
        raise IngestError("document Bundle has no entries", where=Where(source=source, path="Bundle.entry"))
    composition = entries[0]["resource"]
    if composition.get("resourceType") != "Composition":
        raise IngestError(
            f"a FHIR document must start with a Composition, not {composition.get('resourceType')}",
            where=Where(source=source, path="Bundle.entry[0].resource"),
        )
    index = _Index(entries)
    patient = _patient(index.get(composition.get("subject")), where)
    issues: list[Issue] = []
    meds: list[MedicationLine] = []
    plan: list[PlanItem] = []
    observations: list[Observation] = []
    allergies: list[Allergy] = []
    devices: list[Device] = []
    sections: list[SectionText] = []
    lists: set[MedSection] = set()
    assert kind.sections is not None

    def walk(section: Json, key: str) -> None:
        code = _concept(section.get("code"))
        loinc = next((c.code for c in code.codings if c.system == "http://loinc.org"), None)
        rule = mappings.section_rule(kind.sections or "", (), loinc)
        title = str(section.get("title") or code.text or loinc or "section")
        refs = [r for r in section.get("entry", []) if isinstance(r, Mapping)]
        targets = [t for t in (index.get(r) for r in refs) if t is not None]
        if len(targets) < len(refs):
            issues.append(
                Issue(
                    "warning",
                    "not-found",
                    f"section {title!r}: {len(refs) - len(targets)} unresolved entry reference(s)",
                )
            )
        name = rule.translator if rule else "narrative"
        if name == "medications" and rule is not None:
            which = MedSection(rule.args["list"])
            lists.add(which)
            for i, res in enumerate(targets):
                line = _medication(res, which, f"{key}.{which.value}{i}", index)
                if line is not None:
                    meds.append(line)
        elif name == "plan":
            for i, res in enumerate(targets):
                plan.extend(_plan_items(res, f"{key}.p{i}", index))
            text = _div_text((section.get("text") or {}).get("div"))
            if text:
                sections.append(SectionText(Code("http://loinc.org", loinc or "unknown"), title, text))
        elif name == "allergies":
            for i, res in enumerate(targets):
                if res.get("resourceType") == "AllergyIntolerance":
                    allergies.append(
                        Allergy(
                            f"{key}.a{i}",
                            Concept(),
                            _concept(res.get("code")),
                            _concept(res.get("code")).text,
                            next(
                                (_concept(m).text for r in res.get("reaction", []) for m in r.get("manifestation", [])),
                                None,
                            ),
                        )
                    )
        elif name == "stay_observations":
            for i, res in enumerate(targets):
                if res.get("resourceType") == "Observation":
                    value: str | bool | Concept | None = res.get("valueString")
                    if "valueBoolean" in res:
                        value = bool(res["valueBoolean"])
                    elif "valueCodeableConcept" in res:
                        value = _concept(res["valueCodeableConcept"])
                    observations.append(Observation(f"{key}.o{i}", _concept(res.get("code")), value))
        elif name == "devices":
            for i, res in enumerate(targets):
                dev = index.get(res.get("device")) if res.get("resourceType") == "DeviceUseStatement" else res
                if dev and dev.get("resourceType") == "Device":
                    devices.append(Device(f"{key}.d{i}", _concept(dev.get("type")), _concept(dev.get("type")).text))
        if name in ("narrative", "subsections", "document_status", "stay_observations", "devices") or (
            name == "medications" and not targets
        ):
            text = _div_text((section.get("text") or {}).get("div"))
            if text and name != "subsections":
                sections.append(SectionText(Code("http://loinc.org", loinc or "unknown"), title, text))
        for i, sub in enumerate(section.get("section", [])):
            if isinstance(sub, Mapping):
                walk(sub, f"{key}.{i}")

    for i, section in enumerate(composition.get("section", [])):
        if isinstance(section, Mapping):
            walk(section, f"s{i}")

    enc = index.get(composition.get("encounter"))
    stay = None
    if enc:
        hosp = enc.get("hospitalization") or {}
        period = enc.get("period") or {}
        stay = Stay(
            _time(period.get("start")),
            _time(period.get("end")),
            _organization(index.get(enc.get("serviceProvider"))),
            _concept((enc.get("type") or [{}])[0]),
            _concept(hosp.get("admitSource")),
            _concept(hosp.get("dischargeDisposition")),
            _idents(enc.get("identifier")),
        )
    patient_res = index.get(composition.get("subject")) or {}
    gp = next(
        (
            p
            for p in (_who(r, index) for r in patient_res.get("generalPractitioner", []))
            if isinstance(p, Practitioner)
        ),
        None,
    )
    related = tuple(
        RelatedPerson(
            RelationKind.OTHER,
            _name(res["name"][0]) if res.get("name") else None,
            _concept((res.get("relationship") or [{}])[0]),
            _telecoms(res.get("telecom")),
            _addresses(res.get("address")),
        )
        for res in (e.get("resource", {}) for e in entries)
        if isinstance(res, Mapping) and res.get("resourceType") == "RelatedPerson"
    )
    authors = [_who(a, index) for a in composition.get("author", [])]
    author = next((a for a in authors if isinstance(a, Practitioner)), None)
    legal = next(
        (_who(a.get("party"), index) for a in composition.get("attester", []) if a.get("mode") == "legal"), None
    )
    ident = composition.get("identifier") or bundle.get("identifier")
    doc_id = _ident(ident) if isinstance(ident, Mapping) else None
    if doc_id is None:
        doc_id = Ident("urn:ietf:rfc:3986", f"urn:uuid:{bundle.get('id') or composition.get('id') or 'unknown'}")
        issues.append(Issue("warning", "incomplete", "the document has no identifier; the Bundle id is used"))
    conf = composition.get("confidentiality")
    return Letter(
        format=kind.format,
        doc_type=_concept(composition.get("type")),
        doc_id=doc_id,
        patient=patient,
        title=str(composition.get("title") or kind.label),
        date=_time(composition.get("date")),
        confidentiality=conf if isinstance(conf, str) else None,
        status="preliminary" if composition.get("status") == "preliminary" else "final",
        language=composition.get("language"),
        related_persons=related,
        author=author,
        custodian=_organization(index.get(composition.get("custodian"))),
        legal_authenticator=legal if isinstance(legal, Practitioner) else None,
        gp=gp,
        stay=stay,
        medications=tuple(meds),
        plan=tuple(plan),
        observations=tuple(observations),
        allergies=tuple(allergies),
        devices=tuple(devices),
        sections=tuple(sections),
        issues=tuple(issues),
        has_discharge_list=MedSection.DISCHARGE in lists,
        has_stopped_list=MedSection.STOPPED in lists,
        has_admission_list=MedSection.ADMISSION in lists,
    )


def _plan_items(res: Json, key: str, index: _Index) -> list[PlanItem]:
    out: list[PlanItem] = []
    if res.get("resourceType") == "CarePlan":
        for i, activity in enumerate(res.get("activity", [])):
            detail = activity.get("detail") or {}
            kind_map = {"Appointment": "encounter", "ServiceRequest": "request"}
            code = _concept(detail.get("code"))
            text = detail.get("description") or code.text or ""
            period = detail.get("scheduledPeriod") or {}
            performer = _who((detail.get("performer") or [None])[0], index)
            out.append(
                PlanItem(
                    kind_map.get(str(detail.get("kind")), "act"),  # type: ignore[arg-type]
                    f"{key}.{i}",
                    text or "activité",
                    code,
                    Concept(),
                    _time(period.get("start") or detail.get("scheduledString")),
                    _time(period.get("end")),
                    performer,
                )
            )
    elif res.get("resourceType") in ("ServiceRequest", "Appointment"):
        code = _concept(res.get("code") or (res.get("serviceType") or [{}])[0])
        out.append(
            PlanItem(
                "encounter" if res.get("resourceType") == "Appointment" else "request",
                key,
                res.get("description") or code.text or "demande",
                code,
                Concept(),
                _time(res.get("start") or res.get("occurrenceDateTime")),
                _time(res.get("end")),
                _who((res.get("performer") or [None])[0], index),
            )
        )
    return out


def read_fhir_list(data: Json, fmt: str, source: str) -> Letter:
    """A FHIR List (or collection Bundle) of MedicationStatement used as the admission list."""
    where = Where(source=source)
    if data.get("resourceType") == "List":
        index = _Index([], data.get("contained", []))
        items = [index.get(e.get("item")) for e in data.get("entry", []) if isinstance(e, Mapping)]
        subject = data.get("subject") or {}
        patient_res = index.get(subject)
    else:
        entries = [e for e in data.get("entry", []) if isinstance(e, Mapping)]
        index = _Index(entries)
        items = [e.get("resource") for e in entries]
        patient_res = next((r for r in items if isinstance(r, Mapping) and r.get("resourceType") == "Patient"), None)
        subject = {}
    ids: tuple[Ident, ...] = ()
    if patient_res:
        ids = _idents(patient_res.get("identifier"))
    elif isinstance(subject.get("identifier"), Mapping):
        found = _ident(subject["identifier"])
        ids = (found,) if found else ()
    if not ids:
        raise MissingIdentity("the prior medication list does not identify its patient", where=where)
    meds = [
        line
        for i, res in enumerate(items)
        if isinstance(res, Mapping)
        for line in [_medication(res, MedSection.ADMISSION, f"list.{i}", index)]
        if line is not None
    ]
    date = data.get("date") or data.get("timestamp")
    return Letter(
        format=fmt,
        doc_type=_concept(data.get("code")),
        doc_id=Ident("urn:ietf:rfc:3986", f"urn:uuid:{data.get('id') or 'prior'}"),
        patient=Patient(ids),
        title=str(data.get("title") or "Liste de traitements antérieure"),
        date=_time(date),
        medications=tuple(meds),
        has_admission_list=True,
    )


assert {"medications", "plan", "allergies", "stay_observations", "devices", "narrative"} <= SECTION_TRANSLATORS
