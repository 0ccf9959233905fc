"""CDA R2 adapter: CI-SIS (LDL-SES, LDL-EES, VSM) and HL7 C-CDA documents → :class:`Letter`.

The header is read the same way for every CDA flavour; the body is walked section by section and
each section goes to the translator its format's table in ``mappings/`` names (matched by templateId,
then LOINC code).  Sections no table claims are kept as narrative, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lxml import etree

from gateway.errors import MissingIdentity, UnsupportedDocument, Where
from gateway.mappings import DocumentKind, Mappings, SectionRule
from gateway.model import (
    Allergy,
    Code,
    Concept,
    Device,
    Ident,
    Letter,
    MedicationLine,
    MedSection,
    Narrative,
    Observation,
    Organization,
    Patient,
    PlanItem,
    Practitioner,
    RelatedPerson,
    RelationKind,
    SectionText,
    Stay,
    Timing,
)
from gateway.text import fold
from gateway.translate.cda_types import XSI_TYPE, CdaContext, _first, q, text_of
from gateway.translate.registry import SECTION_TRANSLATORS

__all__ = ["read_cda"]

LOINC = "2.16.840.1.113883.6.1"
PCP = "PCP"
_CELL_TAGS = frozenset({q("th"), q("td")})
_Q_ASSIGNED_PERSON, _Q_CODE, _Q_DOSE_QUANTITY, _Q_EFFECTIVE_TIME = map(
    q, ("assignedPerson", "code", "doseQuantity", "effectiveTime")
)
_Q_ENTRY_RELATIONSHIP, _Q_HIGH, _Q_ID, _Q_LOW = map(q, ("entryRelationship", "high", "id", "low"))
_Q_MAX_DOSE_QUANTITY, _Q_NAME, _Q_PRIORITY_CODE = map(q, ("maxDoseQuantity", "name", "priorityCode"))
_Q_REPRESENTED_ORGANIZATION, _Q_ROUTE_CODE, _Q_TEMPLATE_ID = map(
    q, ("representedOrganization", "routeCode", "templateId")
)
_Q_TEXT, _Q_TH, _Q_TD, _Q_TITLE, _Q_VALUE = map(q, ("text", "th", "td", "title", "value"))
_COMMENT_HEADERS = ("commentaire", "commentaires", "comment", "comments", "remarque", "motif")


@dataclass
class _Parts:
    """Mutable accumulator filled by the section translators."""

    medications: list[MedicationLine] = field(default_factory=list)
    plan: list[PlanItem] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    allergies: list[Allergy] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    sections: list[SectionText] = field(default_factory=list)
    lists: set[MedSection] = field(default_factory=set)
    admit_mode: Concept = field(default_factory=Concept)
    discharge_mode: Concept = field(default_factory=Concept)
    status: str | None = None


Translator = Callable[[etree._Element, SectionRule, CdaContext, _Parts, str], None]


def read_cda(root: etree._Element, kind: DocumentKind, mappings: Mappings, source: str, zone: str) -> Letter:
    """Read a whole CDA document into the neutral model."""
    ctx = CdaContext(mappings, root, source, zone)
    version = _template_version(root, kind, ctx)
    patient, related = _patient(root, ctx, source)
    parts = _Parts()
    body = ctx.child(root, "component", "structuredBody")
    unstructured = ctx.child(root, "component", "nonXMLBody")
    if body is None and unstructured is None:
        raise UnsupportedDocument(
            "CDA without a body (neither structuredBody nor nonXMLBody)", where=Where(source=source)
        )
    assert kind.sections is not None
    if body is not None:
        for index, section in enumerate(ctx.children(body, "component", "section")):
            _walk(section, kind.sections, ctx, parts, f"s{index}")
    attachment = None
    if unstructured is not None:
        # a CI-SIS level-1 letter (PDF in the CDA): the header still routes it and the GP still gets the
        # document, but nothing in it can be read as data -- say so, never guess
        attachment = _embedded(unstructured, ctx)
        ctx.note(
            "warning",
            "incomplete",
            "the letter is an unstructured document (nonXMLBody): no medication change, plan or result "
            "can be read from it; the document is forwarded as is",
            unstructured,
        )
    stay = _stay(root, ctx, parts)
    gp = _gp(root, ctx)
    doc_id = ctx.ident(ctx.child(root, "id"))
    if doc_id is None:
        raise MissingIdentity("the document has no id (ClinicalDocument/id)", where=Where(source=source))
    set_id = ctx.ident(ctx.child(root, "setId"))
    version_el = ctx.child(root, "versionNumber")
    version_number = _int(version_el.get("value")) if version_el is not None else None
    author_el = next(
        (a for a in ctx.children(root, "author", "assignedAuthor") if ctx.child(a, "assignedPerson") is not None),
        ctx.child(root, "author", "assignedAuthor"),
    )
    custodian = ctx.organization(ctx.child(root, "custodian", "assignedCustodian", "representedCustodianOrganization"))
    recipients = tuple(
        p
        for p in (
            ctx.practitioner(el, person_tag="informationRecipient")
            for el in ctx.children(root, "informationRecipient", "intendedRecipient")
        )
        if p is not None
    )
    code_el = ctx.child(root, "code")
    conf = ctx.child(root, "confidentialityCode")
    lang = ctx.child(root, "languageCode")
    return Letter(
        format=kind.format,
        doc_type=ctx.concept(code_el),
        doc_id=doc_id,
        patient=patient,
        title=text_of(ctx.child(root, "title")) or kind.label,
        set_id=set_id,
        version=version_number,
        date=ctx.ts(ctx.child(root, "effectiveTime")),
        confidentiality=conf.get("code") if conf is not None else None,
        status=parts.status,
        language=lang.get("code") if lang is not None else None,
        template_version=version,
        related_persons=related,
        author=ctx.practitioner(author_el),
        custodian=custodian,
        legal_authenticator=ctx.practitioner(ctx.child(root, "legalAuthenticator", "assignedEntity")),
        recipients=recipients,
        gp=gp,
        stay=stay,
        medications=tuple(parts.medications),
        plan=tuple(parts.plan),
        observations=tuple(parts.observations),
        allergies=tuple(parts.allergies),
        devices=tuple(parts.devices),
        sections=tuple(parts.sections),
        issues=tuple(ctx.issues),
        has_discharge_list=MedSection.DISCHARGE in parts.lists,
        has_stopped_list=MedSection.STOPPED in parts.lists,
        has_admission_list=MedSection.ADMISSION in parts.lists,
        attachment=attachment,
    )


def _embedded(element: etree._Element, ctx: CdaContext) -> tuple[str, bytes] | None:
    """The (media type, bytes) a nonXMLBody carries inline (base64), or None for a reference."""
    import base64
    import binascii

    text = ctx.child(element, "text")
    if text is None or text.get("representation") != "B64":
        ctx.note("warning", "not-supported", "nonXMLBody content is not inline base64: not forwarded", element)
        return None
    try:
        data = base64.b64decode("".join((text.text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        ctx.note("warning", "invalid", "nonXMLBody base64 content is corrupt: not forwarded", element)
        return None
    return (text.get("mediaType") or "application/octet-stream", data)


# -- header ----------------------------------------------------------------------------------------


def _template_version(root: etree._Element, kind: DocumentKind, ctx: CdaContext) -> str | None:
    for template in ctx.children(root, "templateId"):
        if template.get("root") == kind.template_id:
            version = template.get("extension")
            if kind.known_versions and version not in kind.known_versions:
                ctx.note(
                    "warning",
                    "not-supported",
                    f"{kind.label} version {version or '(none)'} is not one of {', '.join(kind.known_versions)}; "
                    "read with the latest known rules",
                    template,
                )
            return version
    return None


def _patient(root: etree._Element, ctx: CdaContext, source: str) -> tuple[Patient, tuple[RelatedPerson, ...]]:
    role = ctx.child(root, "recordTarget", "patientRole")
    if role is None:
        raise MissingIdentity("the letter has no patient (recordTarget/patientRole)", where=Where(source=source))
    ids = tuple(i for i in ctx.idents(role) if i.system != "urn:ietf:rfc:3986" or i.value)
    if not ids:
        raise MissingIdentity(
            "the letter has no patient identifier (recordTarget/patientRole/id: no INS, no IPP)",
            where=Where(source=source, line=role.sourceline if isinstance(role.sourceline, int) else None),
        )
    person = ctx.child(role, "patient")
    gender = None
    birth = None
    if person is not None:
        gender_el = ctx.child(person, "administrativeGenderCode")
        if gender_el is not None and gender_el.get("code"):
            mapped = ctx.mappings.code("gender").lookup(gender_el.get("code", ""))
            gender = str(mapped) if mapped else None
        born = ctx.ts(ctx.child(person, "birthTime"))
        birth = born.value[:10] if born else None
    patient = Patient(ids, ctx.names(person), gender, birth, ctx.telecoms(role), ctx.addresses(role))
    related: list[RelatedPerson] = []
    if person is not None:
        for guardian in ctx.children(person, "guardian"):
            org = ctx.organization(ctx.child(guardian, "guardianOrganization"))
            related.append(_related(ctx, "GUARD", guardian, ctx.child(guardian, "guardianPerson"), org))
    for entity in ctx.children(root, "informant", "relatedEntity"):
        related.append(
            _related(ctx, entity.get("classCode") or "PRS", entity, ctx.child(entity, "relatedPerson"), None)
        )
    for participant in ctx.children(root, "participant"):
        associated = ctx.child(participant, "associatedEntity")
        if associated is None or associated.get("classCode") not in ("ECON", "NOK", "GUARD", "CAREGIVER", "PRS"):
            continue
        org = ctx.organization(ctx.child(associated, "scopingOrganization"))
        related.append(
            _related(
                ctx, associated.get("classCode") or "PRS", associated, ctx.child(associated, "associatedPerson"), org
            )
        )
    return patient, tuple(related)


def _related(
    ctx: CdaContext,
    class_code: str,
    entity: etree._Element,
    person: etree._Element | None,
    org: Organization | None,
) -> RelatedPerson:
    entry = ctx.mappings.code("related-person").lookup(class_code)
    names = ctx.names(person)
    own_code = ctx.concept(ctx.child(entity, "code"))
    if isinstance(entry, dict):
        kind = RelationKind(entry["kind"])
        base = Code(entry["system"], entry["code"], entry.get("display"))
        label = str(entry.get("display") or "")
        relationship = Concept((base, *own_code.codings), f"{label} ({own_code.text})" if own_code.text else label)
    else:
        kind = RelationKind.OTHER
        relationship = Concept(
            (Code("http://terminology.hl7.org/CodeSystem/v3-RoleClass", class_code), *own_code.codings),
            own_code.text,
        )
    return RelatedPerson(
        kind, names[0] if names else None, relationship, ctx.telecoms(entity), ctx.addresses(entity), org
    )


def _gp(root: etree._Element, ctx: CdaContext) -> Practitioner | None:
    """The médecin traitant: participant with functionCode PCP (CI-SIS) or serviceEvent performer PCP."""
    for participant in ctx.children(root, "participant"):
        function = ctx.child(participant, "functionCode")
        if function is not None and function.get("code") == PCP:
            entity = ctx.child(participant, "associatedEntity")
            gp = ctx.practitioner(entity, person_tag="associatedPerson")
            if gp is not None and entity is not None and gp.organization is None:
                org = ctx.organization(ctx.child(entity, "scopingOrganization"))
                gp = Practitioner(gp.ids, gp.name, gp.role, gp.telecoms, gp.addresses, org)
            return gp
    for performer in ctx.children(root, "documentationOf", "serviceEvent", "performer"):
        function = ctx.child(performer, "functionCode")
        if function is not None and function.get("code") == PCP:
            return ctx.practitioner(ctx.child(performer, "assignedEntity"))
    return None


def _stay(root: etree._Element, ctx: CdaContext, parts: _Parts) -> Stay | None:
    encounter = ctx.child(root, "componentOf", "encompassingEncounter")
    service = ctx.child(root, "documentationOf", "serviceEvent", "effectiveTime")
    if encounter is None and service is None:
        return None
    start, end = ctx.interval(ctx.child(encounter, "effectiveTime") if encounter is not None else None)
    if start is None and end is None:
        start, end = ctx.interval(service)
    facility = None
    facility_type = Concept()
    ids: tuple[Ident, ...] = ()
    discharge = parts.discharge_mode
    if encounter is not None:
        ids = ctx.idents(encounter)
        hcf = ctx.child(encounter, "location", "healthCareFacility")
        if hcf is not None:
            facility_type = ctx.concept(ctx.child(hcf, "code"))
            facility = ctx.organization(ctx.child(hcf, "serviceProviderOrganization"))
        if facility is None:
            facility = ctx.organization(
                ctx.child(encounter, "responsibleParty", "assignedEntity", "representedOrganization")
            )
        if not discharge:
            discharge = ctx.concept(ctx.child(encounter, "dischargeDispositionCode"))
    klass = "IMP"
    code_el = ctx.child(encounter, "code") if encounter is not None else None
    if (
        code_el is not None
        and code_el.get("codeSystem") == "2.16.840.1.113883.5.4"
        and code_el.get("code") in _ENCOUNTER_CLASSES
    ):
        klass = str(code_el.get("code"))
    return Stay(start, end, facility, facility_type, parts.admit_mode, discharge, ids, klass)


_ENCOUNTER_CLASSES = {"IMP", "EMER", "AMB", "ACUTE", "NONAC", "SS", "HH", "OBSENC", "PRENC", "VR", "FLD"}


# -- body ------------------------------------------------------------------------------------------


def _walk(section: etree._Element, table: str, ctx: CdaContext, parts: _Parts, key: str) -> None:
    kids = ctx.kids(section)
    template_ids = [t.get("root") or "" for t in kids.get(_Q_TEMPLATE_ID, ())]
    code_el = _first(kids, _Q_CODE)
    loinc = code_el.get("code") if code_el is not None else None
    rule = ctx.mappings.section_rule(table, template_ids, loinc)
    if section.get("nullFlavor") is not None:
        title = text_of(ctx.child(section, "title")) or loinc or "section"
        ctx.note(
            "information",
            "informational",
            f"section {title!r} declares no information (nullFlavor {section.get('nullFlavor')})",
            section,
        )
        return
    if rule is None:
        _keep_narrative(section, ctx, parts)
        for index, sub in enumerate(ctx.children(section, "component", "section")):
            _walk(sub, table, ctx, parts, f"{key}.{index}")
        return
    _TRANSLATORS[rule.translator](section, rule, ctx, parts, key)


def _keep_narrative(section: etree._Element, ctx: CdaContext, parts: _Parts) -> None:
    kids = ctx.kids(section)
    text = text_of(_first(kids, _Q_TEXT))
    if not text:
        return
    code_el = _first(kids, _Q_CODE)
    title = text_of(_first(kids, _Q_TITLE)) or (code_el.get("displayName") if code_el is not None else "") or ""
    code = Code(
        ctx.system(code_el.get("codeSystem")) or "http://loinc.org" if code_el is not None else "http://loinc.org",
        (code_el.get("code") if code_el is not None else None) or "unknown",
        code_el.get("displayName") if code_el is not None else None,
    )
    parts.sections.append(SectionText(code, title or code.code, text))


def _narrative(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    _keep_narrative(section, ctx, parts)


def _subsections(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    table = _table_of(ctx, rule)
    subs = ctx.children(section, "component", "section")
    if not subs:
        _keep_narrative(section, ctx, parts)
    for index, sub in enumerate(subs):
        _walk(sub, table, ctx, parts, f"{key}.{index}")


def _table_of(ctx: CdaContext, rule: SectionRule) -> str:
    for name, table in ctx.mappings.sections.items():
        if rule in table.sections:
            return name
    raise AssertionError("rule without table")  # pragma: no cover - rules come from the tables


def _document_status(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    """CI-SIS "Statut du document": a provisional letter is flagged to every reader."""
    for obs in section.iter(q("observation")):
        value = ctx.concept(ctx.child(obs, "value"))
        label = value.text or text_of(ctx.child(section, "text")) or "?"
        table = ctx.mappings.code("document-status")
        status = next(
            (table.lookup(f"{c.system}|{c.code}") for c in value.codings if table.lookup(f"{c.system}|{c.code}")), None
        )
        if status is None:
            ctx.note("warning", "code-unknown", f"document status {label!r} not recognised: treated as final", obs)
            parts.status = "final"
        else:
            parts.status = str(status)
        if parts.status == "preliminary":
            ctx.note("warning", "informational", f"the letter is marked provisional: {label}", obs)
        return


def _stay_observations(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    found = False
    for index, obs in enumerate(section.iter(q("observation"))):
        kids = ctx.kids(obs)
        code = ctx.concept(_first(kids, _Q_CODE))
        if not code.codings:
            continue
        found = True
        value_el = _first(kids, _Q_VALUE)
        value = _value(value_el, ctx)
        first = code.codings[0].code
        if first == rule.args.get("admit_mode", "ORG-070") and isinstance(value, Concept):
            parts.admit_mode = value
            continue
        if first == rule.args.get("discharge_mode", "ORG-074") and isinstance(value, Concept):
            parts.discharge_mode = value
            continue
        ref = ctx.child(obs, "text", "reference")
        text = text_of(ctx.narrative(ref.get("value"))) if ref is not None else None
        parts.observations.append(Observation(f"{key}.o{index}", code, value, text or None))
    if not found:
        _keep_narrative(section, ctx, parts)


def _value(element: etree._Element | None, ctx: CdaContext) -> str | bool | Concept | None:
    if element is None or element.get("nullFlavor") is not None:
        return None
    kind = (element.get(XSI_TYPE) or "").split(":")[-1]
    if kind == "BL":
        raw = element.get("value")
        return raw == "true" if raw in ("true", "false") else None
    if kind in ("CD", "CE", "CV", "CO"):
        concept = ctx.concept(element)
        return concept or None
    if kind == "PQ":
        return f"{element.get('value', '')} {element.get('unit', '')}".strip() or None
    text = text_of(element)
    if not text:
        ref = ctx.child(element, "reference")
        text = text_of(ctx.narrative(ref.get("value"))) if ref is not None else ""
    return text or None


# -- medications -----------------------------------------------------------------------------------


def _table_headers(row: etree._Element, ctx: CdaContext) -> tuple[str, ...]:
    """The folded header cells of the row's table, read once per table (every drug row asks)."""
    table = next(row.iterancestors(q("table")), None)
    if table is None:
        return ()
    headers = ctx.table_headers.get(table)
    if headers is None:
        head = ctx.child(table, "thead", "tr")
        if head is None:
            head = next(iter(table.iter(q("tr"))), None)
        headers = () if head is None else tuple(fold(text_of(cell)) for cell in head if cell.tag in _CELL_TAGS)
        ctx.table_headers[table] = headers
    return headers


def _row_of(element: etree._Element | None) -> etree._Element | None:
    if element is None:
        return None
    if element.tag == q("tr"):
        return element
    return next(element.iterancestors(q("tr")), None)


def _row_narrative(row: etree._Element | None, ctx: CdaContext) -> Narrative:
    if row is None:
        return Narrative()
    headers = _table_headers(row, ctx)
    kids = ctx.kids(row)
    th, td = kids.get(_Q_TH), kids.get(_Q_TD)
    # (one kind of cell, the usual row: already in document order)
    cells = (td or []) if not th else th if not td else [c for c in row if c.tag in _CELL_TAGS]
    pairs = tuple((headers[i] if i < len(headers) else f"col{i}", text_of(cell)) for i, cell in enumerate(cells))
    return Narrative(pairs, " | ".join(text for _, text in pairs if text))


def _substance_administrations(section: etree._Element, ctx: CdaContext) -> list[etree._Element]:
    """Top-level medication entries: the entry's own, or wrapped in an act (C-CDA discharge meds)."""
    found: list[etree._Element] = []
    for entry in ctx.children(section, "entry"):
        direct = ctx.child(entry, "substanceAdministration")
        if direct is not None:
            found.append(direct)
            continue
        for act in ctx.children(entry, "act"):
            found.extend(ctx.children(act, "entryRelationship", "substanceAdministration"))
    return found


def _medications(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    which = MedSection(rule.args["list"])
    parts.lists.add(which)
    entries = _substance_administrations(section, ctx)
    rows_used: list[etree._Element] = []  # the elements themselves: lxml proxies' id() is not stable
    for index, sa in enumerate(entries):
        line = _medication(sa, which, f"{key}.{which.value}{index}", ctx, section, rows_used)
        if line is not None:
            parts.medications.append(line)
    if not entries:
        _keep_narrative(section, ctx, parts)
        text = text_of(ctx.child(section, "text"))
        if text:
            ctx.note(
                "warning",
                "incomplete",
                f"section {rule.title!r} has medication narrative but no coded entries; kept as text only",
                section,
            )


def _medication(
    sa: etree._Element,
    which: MedSection,
    key: str,
    ctx: CdaContext,
    section: etree._Element,
    rows_used: list[etree._Element],
) -> MedicationLine | None:
    kids = ctx.kids(sa)  # (the entry's children, read once for the lookups below)
    material = ctx.child(sa, "consumable", "manufacturedProduct", "manufacturedMaterial")
    material_kids = ctx.kids(material) if material is not None else None
    product = ctx.concept(_first(material_kids, _Q_CODE) if material_kids is not None else None)
    name = text_of(_first(material_kids, _Q_NAME)) if material_kids is not None else ""
    reference = ctx.child(sa, "text", "reference")
    if reference is None and material is not None:
        # some letters link the row only through the product's originalText
        reference = ctx.child(material, "code", "originalText", "reference")
    ref_value = reference.get("value") if reference is not None else None
    target = ctx.narrative(ref_value)
    if ref_value and target is None:
        ctx.note("warning", "not-found", f"narrative reference {ref_value!r} points nowhere", sa)
    if ref_value and not ref_value.startswith("#") and target is not None:
        ctx.note("information", "informational", f"narrative reference {ref_value!r} lacks '#'; resolved", sa)
    row = _row_of(target)
    name = name or product.text or (product.codings[0].display if product.codings else "") or ""
    if row is None:
        row = _row_by_name(section, name, rows_used, ctx)
        if row is not None:
            ctx.note("information", "informational", f"narrative row for {name!r} found by drug name", sa)
    if row is not None:
        rows_used.append(row)
    narrative = _row_narrative(row, ctx)
    if not name:
        name = narrative.cell("medicament", "medication", "medicaments", "drug") or text_of(target) or ""
    if not name and not product.codings:
        ctx.note("warning", "incomplete", "medication entry without product code or name skipped", sa)
        return None
    start = end = None
    timing: Timing | None = None
    for eff in kids.get(_Q_EFFECTIVE_TIME, ()):
        kind = (eff.get(XSI_TYPE) or "").split(":")[-1]
        if eff.get("operator") == "A" or kind in ("PIVL_TS", "EIVL_TS"):
            timing = ctx.timing(eff) or timing
        elif kind in ("IVL_TS", "") and start is None and end is None:
            start, end = ctx.interval(eff)
    dose_el = _first(kids, _Q_DOSE_QUANTITY)
    dose = dose_high = None
    if dose_el is not None:
        dose_kids = ctx.kids(dose_el)
        low, high = _first(dose_kids, _Q_LOW), _first(dose_kids, _Q_HIGH)
        if low is not None or high is not None:
            dose, dose_high = ctx.dose(low), ctx.dose(high)
            dose = dose or dose_high
            if dose_high is not None and dose is not None and dose_high.value == dose.value:
                dose_high = None
        else:
            dose = ctx.dose(dose_el)
    comment = narrative.cell(*_COMMENT_HEADERS)
    instructions = None
    indication = Concept()
    for rel in kids.get(_Q_ENTRY_RELATIONSHIP, ()):
        act = ctx.child(rel, "act")
        if rel.get("typeCode") == "SUBJ" and act is not None:
            ref = ctx.child(act, "text", "reference")
            instructions = (
                text_of(ctx.narrative(ref.get("value"))) if ref is not None else text_of(ctx.child(act, "text"))
            )
        elif rel.get("typeCode") == "RSON":
            target_el = act if act is not None else ctx.child(rel, "observation")
            if target_el is not None:
                indication = ctx.concept(ctx.child(target_el, "code"))
                value = ctx.child(target_el, "value")
                if not indication.codings and value is not None:
                    indication = ctx.concept(value)
    return MedicationLine(
        section=which,
        key=key,
        product=product,
        name=name,
        ids=ctx.idents(sa),
        dose=dose,
        dose_high=dose_high,
        timing=timing,
        route=ctx.concept(_first(kids, _Q_ROUTE_CODE)),
        start=start,
        end=end,
        max_dose=ctx.ratio(_first(kids, _Q_MAX_DOSE_QUANTITY)),
        comment=comment,
        instructions=instructions or None,
        narrative=narrative,
        indication=indication,
        mood=sa.get("moodCode") or "EVN",
    )


def _row_by_name(
    section: etree._Element, name: str, used: list[etree._Element], ctx: CdaContext
) -> etree._Element | None:
    """The one narrative row whose text names this drug; None when absent or ambiguous (never guess)."""
    if not name:
        return None
    wanted = fold(name)
    hits = [
        row
        for row in section.iter(q("tr"))
        if not any(row is u for u in used)
        and ctx.child(row, "td") is not None
        and wanted
        and wanted in fold(text_of(row))
    ]
    return hits[0] if len(hits) == 1 else None


# -- plan ------------------------------------------------------------------------------------------

_PLAN_KINDS = {
    "procedure": "act",
    "act": "act",
    "observation": "request",
    "encounter": "encounter",
    "substanceAdministration": "act",
    "supply": "act",
}


def _plan(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    _keep_narrative(section, ctx, parts)
    entries = ctx.children(section, "entry")
    for index, entry in enumerate(entries):
        element = next((e for e in entry if isinstance(e.tag, str) and e.tag.rsplit("}", 1)[-1] in _PLAN_KINDS), None)
        if element is None:
            continue
        kind = _PLAN_KINDS[element.tag.rsplit("}", 1)[-1]]
        item = _plan_item(element, kind, f"{key}.p{index}", ctx)
        if item is not None:
            parts.plan.append(item)
    if not entries:
        text_el = ctx.child(section, "text")
        blocks = (
            []
            if text_el is None
            else [text_of(b) for b in text_el.iter(q("paragraph"), q("item"), q("td")) if text_of(b)]
        )
        if not blocks and text_of(text_el):
            blocks = [text_of(text_el)]
        for index, block in enumerate(blocks):
            parts.plan.append(PlanItem("narrative", f"{key}.n{index}", block))


def _plan_item(element: etree._Element, kind: str, key: str, ctx: CdaContext) -> PlanItem | None:
    kids = ctx.kids(element)
    code = ctx.concept(_first(kids, _Q_CODE))
    ref = ctx.child(element, "text", "reference")
    text = text_of(ctx.narrative(ref.get("value"))) if ref is not None else text_of(_first(kids, _Q_TEXT))
    value = _value(_first(kids, _Q_VALUE), ctx)
    if isinstance(value, str) and value and value not in text:
        text = f"{text} — {value}" if text else value
    if not text:
        text = code.text or (code.codings[0].display if code.codings and code.codings[0].display else "") or ""
    if not text and not code.codings:
        return None
    start, end = ctx.interval(_first(kids, _Q_EFFECTIVE_TIME))
    performer: Practitioner | Organization | None = None
    perf = ctx.child(element, "performer", "assignedEntity")
    if perf is not None:
        perf_kids = ctx.kids(perf)
        represented = _first(perf_kids, _Q_REPRESENTED_ORGANIZATION)
        if _first(perf_kids, _Q_ASSIGNED_PERSON) is not None or (
            _first(perf_kids, _Q_ID) is not None and represented is None
        ):
            performer = ctx.practitioner(perf)
        else:
            performer = ctx.organization(represented)
    if performer is None:
        participant = ctx.child(element, "participant", "participantRole")
        if participant is not None:
            performer = ctx.practitioner(participant, person_tag="playingEntity")
    return PlanItem(
        kind,  # type: ignore[arg-type]
        key,
        text or code.codings[0].code,
        code,
        ctx.concept(_first(kids, _Q_PRIORITY_CODE)),
        start,
        end,
        performer,
    )


# -- allergies, devices ----------------------------------------------------------------------------


def _allergies(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    found = False
    none_table = ctx.mappings.code("no-known-allergy")
    for index, obs in enumerate(section.iter(q("observation"))):
        templates = {t.get("root") for t in ctx.children(obs, "templateId")}
        playing = ctx.child(obs, "participant", "participantRole", "playingEntity")
        if playing is None and not templates & _ALLERGY_TEMPLATES:
            continue
        found = True
        substance = ctx.concept(ctx.child(playing, "code") if playing is not None else None)
        if not substance and playing is not None:
            substance = Concept((), text_of(ctx.child(playing, "name")) or None)
        value = ctx.concept(ctx.child(obs, "value"))
        ref = ctx.child(obs, "text", "reference")
        text = text_of(ctx.narrative(ref.get("value"))) if ref is not None else ""
        says_none = obs.get("negationInd") == "true" or any(
            none_table.lookup(f"{c.system}|{c.code}") for c in (*substance.codings, *value.codings)
        )
        if says_none:
            parts.allergies.append(
                Allergy(f"{key}.a{index}", Concept(), NO_KNOWN_ALLERGY, text or value.text or None, None, none=True)
            )
            continue
        reaction = next(
            (
                ctx.concept(ctx.child(r, "observation", "value")).text
                for r in ctx.children(obs, "entryRelationship")
                if r.get("typeCode") == "MFST"
            ),
            None,
        )
        described = substance if substance else value
        if not described:
            ctx.note("warning", "incomplete", "allergy entry names neither substance nor description", obs)
        parts.allergies.append(
            Allergy(f"{key}.a{index}", ctx.concept(ctx.child(obs, "code")), described, text or None, reaction)
        )
    if not found:
        _keep_narrative(section, ctx, parts)


_ALLERGY_TEMPLATES = {"1.3.6.1.4.1.19376.1.5.3.1.4.6", "2.16.840.1.113883.10.20.22.4.7", "1.2.250.1.213.1.1.3.41"}
NO_KNOWN_ALLERGY = Concept((Code("http://snomed.info/sct", "716186003", "No known allergy"),), "Aucune allergie connue")


def _devices(section: etree._Element, rule: SectionRule, ctx: CdaContext, parts: _Parts, key: str) -> None:
    found = False
    for index, role in enumerate(section.iter(q("participantRole"))):
        device = ctx.child(role, "playingDevice")
        if device is None:
            continue
        found = True
        code = ctx.concept(ctx.child(device, "code"))
        udi = next((i.get("extension") for i in ctx.children(role, "id") if i.get("extension")), None)
        supply = next(role.iterancestors(q("supply"), q("procedure")), None)
        ref = ctx.child(supply, "text", "reference") if supply is not None else None
        text = text_of(ctx.narrative(ref.get("value"))) if ref is not None else ""
        parts.devices.append(Device(f"{key}.d{index}", code, text or code.text, udi))
    if not found:
        _keep_narrative(section, ctx, parts)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


_TRANSLATORS: dict[str, Translator] = {
    "allergies": _allergies,
    "devices": _devices,
    "document_status": _document_status,
    "medications": _medications,
    "narrative": _narrative,
    "plan": _plan,
    "stay_observations": _stay_observations,
    "subsections": _subsections,
}
assert set(_TRANSLATORS) == SECTION_TRANSLATORS, "the CDA adapter must implement every section translator"
