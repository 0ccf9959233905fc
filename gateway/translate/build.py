"""Build the FHIR R4 resources for a letter (plain JSON-shaped dicts, validated later).

Resources are dicts rather than fhir.resources models on purpose: model construction and
``model_dump_json`` cost several times the whole translation budget (reference/performance.md).
Their validity is guaranteed by :mod:`gateway.validate`, run on every resource before output, and by
tests that put every output through the R4B models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from gateway.mappings import Mappings
from gateway.model import (
    Address,
    Allergy,
    Concept,
    Device,
    Dose,
    Ident,
    Issue,
    Letter,
    MedicationLine,
    MedSection,
    Name,
    Observation,
    Organization,
    PlanItem,
    Practitioner,
    RelatedPerson,
    Telecom,
    Timepoint,
)
from gateway.translate import narrative as nv
from gateway.translate.ids import resource_id, urn
from gateway.translate.reconcile import Basis, Change, Status

__all__ = ["PROJECT", "Built", "build"]

Json = dict[str, Any]

PROJECT = "https://fhir.discharge-gateway.fr"
EXT_CHANGE = f"{PROJECT}/StructureDefinition/medication-change"
EXT_ZONE = f"{PROJECT}/StructureDefinition/time-zone-assumed"
CS_CHANGE = f"{PROJECT}/CodeSystem/medication-change"
CS_LIST = f"{PROJECT}/CodeSystem/list-code"
CS_INTEROP = "https://hl7.fr/ig/fhir/medication/CodeSystem/fr-medication-reconciliation-status"
CS_FLAG = "urn:oid:1.2.36.1.2001.1001.101.104.16592"  # FHIR R4 list-item-flag (Patient Medicine Change Types)
CS_FR_ID_TYPE = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
CS_V2_ID_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
FR_ID_TYPES = {"INS-NIR", "INS-NIA", "INS-NIR-TEST", "INS-NIR-DEMO", "IDNPS", "IDNST", "RPPS", "FINEG", "FINEJ"}
UCUM = "http://unitsofmeasure.org"
_V3_FUNCTION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationFunction"
_V3_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLE_GP = (_V3_FUNCTION, "PCP", "primary care physician")
ROLE_AUTHOR = (_V3_TYPE, "AUT", "author (originator)")
ROLE_RECIPIENT = (_V3_TYPE, "PRCP", "primary information recipient")
ROLE_PERFORMER = (_V3_TYPE, "PRF", "performer")
ROLE_RELATED = (_V3_TYPE, "IND", "indirect target")
LOINC = "http://loinc.org"


@dataclass
class Built:
    """The resources of one letter, plus lookups the labeller and the tests use."""

    resources: list[Json] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    statement_of: dict[str, str] = field(default_factory=dict)  # MedicationLine.key -> resource id
    patient_id: str = ""


def _num(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _ref(resource: Json, display: str | None = None) -> Json:
    ref: Json = {"reference": urn(resource["id"])}
    if display:
        ref["display"] = display
    return ref


def _concept(concept: Concept, text: str | None = None) -> Json | None:
    out: Json = {}
    codings = []
    seen: set[tuple[str, str]] = set()
    for c in concept.codings:
        if (c.system, c.code) in seen:
            continue
        seen.add((c.system, c.code))
        coding: Json = {"system": c.system, "code": c.code}
        if c.display:
            coding["display"] = c.display
        codings.append(coding)
    if codings:
        out["coding"] = codings
    label = text or concept.text
    if label:
        out["text"] = label
    return out or None


def _identifier(ident: Ident, default_type: str | None = None) -> Json:
    out: Json = {}
    if ident.use:
        out["use"] = ident.use
    type_code = ident.type_code or default_type
    if type_code:
        system = CS_FR_ID_TYPE if type_code in FR_ID_TYPES else CS_V2_ID_TYPE
        out["type"] = {"coding": [{"system": system, "code": type_code}]}
    out["system"] = ident.system
    out["value"] = ident.value
    return out


def _name(name: Name) -> Json:
    out: Json = {"use": name.use}
    if name.family:
        out["family"] = name.family
    if name.given:
        out["given"] = list(name.given)
    if name.prefix:
        out["prefix"] = list(name.prefix)
    out["text"] = name.display()
    return out


def _telecom(t: Telecom) -> Json:
    out: Json = {"system": t.system, "value": t.value}
    if t.use:
        out["use"] = t.use
    return out


def _address(a: Address) -> Json:
    out: Json = {}
    if a.use:
        out["use"] = a.use
    if a.lines:
        out["line"] = list(a.lines)
    if a.city:
        out["city"] = a.city
    if a.postal_code:
        out["postalCode"] = a.postal_code
    if a.country:
        out["country"] = a.country
    return out


def _time(point: Timepoint | None) -> str | None:
    return point.value if point else None


def _period(start: Timepoint | None, end: Timepoint | None) -> Json | None:
    out: Json = {}
    if start:
        out["start"] = start.value
    if end:
        out["end"] = end.value
    if start and end and start.value[:10] > end.value[:10]:
        # a reversed period is invalid FHIR; keep the end, report it
        out.pop("start")
    return out or None


def _quantity(dose: Dose) -> Json:
    out: Json = {"value": _num(dose.value)}
    if dose.unit and dose.unit != "1":
        out["unit"] = dose.text.split(" ", 1)[1] if dose.text and " " in dose.text else dose.unit
        if " " not in dose.unit:
            out["system"] = UCUM
            out["code"] = dose.unit
    elif dose.text and " " in dose.text:
        out["unit"] = dose.text.split(" ", 1)[1]
    return out


class _Builder:
    def __init__(self, letter: Letter, mappings: Mappings) -> None:
        self.letter = letter
        self.mappings = mappings
        self.doc_key = f"{letter.doc_id.system}|{letter.doc_id.value}"
        self.out = Built()
        self._by_key: dict[str, Json] = {}
        self.issues: list[Issue] = list(letter.issues)
        self.patient_res: Json = {}
        self.author_role: Json | None = None
        self.encounter_res: Json | None = None
        self.list_res: Json | None = None
        self.careplan_res: Json | None = None
        self.docref: Json | None = None
        self.members: list[tuple[Json, tuple[str, str, str], str]] = []
        self._dosage_texts: dict[int, tuple[MedicationLine, str]] = {}  # id(line) -> (line, its posology)
        self._change_table: tuple[Sequence[Change], str] | None = None  # (changes, their XHTML table)

    def dosage_text(self, line: MedicationLine) -> str:
        """``line.dosage_text()``, worked out once per line (the statement, its dosage and the table ask)."""
        found = self._dosage_texts.get(id(line))
        if found is None or found[0] is not line:
            found = self._dosage_texts[id(line)] = (line, line.dosage_text())
        return found[1]

    def add(self, resource: Json) -> Json:
        self.out.resources.append(resource)
        return resource

    def _new(self, resource_type: str, *key: str) -> Json:
        rid = resource_id(resource_type, *key)
        return {"resourceType": resource_type, "id": rid}

    # -- people ------------------------------------------------------------------------------------
    def organization(self, org: Organization | None) -> Json | None:
        if org is None:
            return None
        key = f"org|{org.ids[0].system}|{org.ids[0].value}" if org.ids else f"org|name|{org.name}"
        if key in self._by_key:
            return self._by_key[key]
        res = self._new("Organization", key)
        if org.ids:
            res["identifier"] = [_identifier(i) for i in org.ids]
        res["active"] = True
        if org.type:
            res["type"] = [_concept(org.type)]
        res["name"] = org.name or (org.ids[0].value if org.ids else "organisation")
        if org.telecoms:
            res["telecom"] = [_telecom(t) for t in org.telecoms]
        if org.addresses:
            res["address"] = [_address(a) for a in org.addresses]
        ids_text = ", ".join(f"{i.type_code or i.system} {i.value}" for i in org.ids)
        res["text"] = nv.generated(nv.dl([("Organisation", res["name"]), ("Identifiants", ids_text)]))
        self._by_key[key] = res
        return self.add(res)

    def practitioner_role(self, person: Practitioner | None, function: str | None = None) -> Json | None:
        """A Practitioner (deduplicated) and its PractitionerRole; returns the role."""
        if person is None:
            return None
        shown = person.name.display() if person.name else None  # (asked for four times below)
        key = (
            f"person|{person.ids[0].system}|{person.ids[0].value}"
            if person.ids
            else f"person|name|{shown or ''}|{person.organization.name if person.organization else ''}"
        )
        org = self.organization(person.organization)
        practitioner = self._by_key.get(key)
        if practitioner is None:
            practitioner = self._new("Practitioner", key)
            if person.ids:
                practitioner["identifier"] = [_identifier(i) for i in person.ids]
            practitioner["active"] = True
            if person.name:
                practitioner["name"] = [_name(person.name)]
            if person.telecoms:
                practitioner["telecom"] = [_telecom(t) for t in person.telecoms]
            if person.addresses:
                practitioner["address"] = [_address(a) for a in person.addresses]
            rpps = next((i.value for i in person.ids if i.type_code == "RPPS"), None)
            practitioner["text"] = nv.generated(nv.dl([("Professionnel", shown), ("RPPS", rpps)]))
            self._by_key[key] = practitioner
            self.add(practitioner)
        role_key = f"role|{key}|{org['id'] if org else ''}"
        role = self._by_key.get(role_key)
        if role is None:
            role = self._new("PractitionerRole", role_key)
            role["active"] = True
            role["practitioner"] = _ref(practitioner, shown)
            if org:
                role["organization"] = _ref(org, org.get("name"))
            codes = [c for c in [_concept(person.role)] if c]
            if codes:
                role["code"] = codes
            if person.telecoms:
                role["telecom"] = [_telecom(t) for t in person.telecoms]
            role["text"] = nv.generated(
                nv.dl(
                    [
                        ("Professionnel", shown),
                        ("Rôle", person.role.text or (person.role.codings[0].code if person.role.codings else None)),
                        ("Structure", org.get("name") if org else None),
                    ]
                )
            )
            self._by_key[role_key] = role
            self.add(role)
        if function and not any(c.get("text") == function for c in role.get("code", [])):
            role.setdefault("code", []).append({"text": function})
        return role

    def member(self, resource: Json | None, role: tuple[str, str, str], text: str) -> Json | None:
        """Record a participant of the patient's care team (for the CareTeam and for routing)."""
        if resource is not None:
            self.members.append((resource, role, text))
        return resource

    def care_team(self) -> Json | None:
        """Everyone the letter names around the patient, each with why: GP, recipients, performers, family."""
        if not self.members:
            return None
        res = self._new("CareTeam", self.doc_key, "care-team")
        res["status"] = "active"
        res["name"] = "Intervenants autour du patient après la sortie"
        res["subject"] = _ref(self.patient_res)
        if self.encounter_res is not None:
            res["encounter"] = _ref(self.encounter_res)
        participants: dict[str, Json] = {}
        rows: list[tuple[str, str]] = []
        for resource, (system, code, display), text in self.members:
            url = urn(resource["id"])
            entry = participants.get(url)
            if entry is None:
                entry = {"role": [], "member": _ref(resource, _display(resource))}
                participants[url] = entry
            if not any(r["coding"][0]["code"] == code for r in entry["role"]):
                entry["role"].append({"coding": [{"system": system, "code": code, "display": display}], "text": text})
                rows.append((_display(resource) or resource["resourceType"], text))
        res["participant"] = list(participants.values())
        if self.careplan_res is not None:
            self.careplan_res["careTeam"] = [_ref(res)]
        res["text"] = nv.generated(nv.table(("Qui", "Rôle"), rows, caption="Intervenants"))
        return self.add(res)

    def performer(self, who: Practitioner | Organization | None) -> Json | None:
        if isinstance(who, Practitioner):
            return self.practitioner_role(who)
        return self.organization(who)

    # -- patient -----------------------------------------------------------------------------------
    def patient(self) -> Json:
        p = self.letter.patient
        key = f"{p.ids[0].system}|{p.ids[0].value}"
        res = self._new("Patient", key)
        res["identifier"] = [_identifier(i, None if i.type_code else "PI") for i in p.ids]
        if p.names:
            res["name"] = [_name(n) for n in p.names]
        if p.telecoms:
            res["telecom"] = [_telecom(t) for t in p.telecoms]
        if p.gender:
            res["gender"] = p.gender
        if p.birth_date:
            res["birthDate"] = p.birth_date
        if p.addresses:
            res["address"] = [_address(a) for a in p.addresses]
        ins = next((i for i in p.ids if (i.type_code or "").startswith("INS")), None)
        res["text"] = nv.generated(
            nv.dl(
                [
                    ("Patient", p.names[0].display() if p.names else None),
                    ("Né(e) le", p.birth_date),
                    ("INS", f"{ins.value} ({ins.type_code})" if ins else "absent (identité non qualifiée)"),
                ]
            )
        )
        self.out.patient_id = res["id"]
        self.patient_res = self.add(res)
        return res

    def related(self, person: RelatedPerson, index: int) -> Json:
        res = self._new("RelatedPerson", self.doc_key, "related", str(index))
        res["active"] = True
        res["patient"] = _ref(self.patient_res)
        rel = _concept(person.relationship)
        if rel:
            res["relationship"] = [rel]
        if person.name:
            res["name"] = [_name(person.name)]
        elif person.organization and person.organization.name:
            res["name"] = [{"text": person.organization.name}]
        if person.telecoms:
            res["telecom"] = [_telecom(t) for t in person.telecoms]
        if person.addresses:
            res["address"] = [_address(a) for a in person.addresses]
        res["text"] = nv.generated(
            nv.dl(
                [
                    (person.relationship.text or person.kind.value, person.name.display() if person.name else None),
                    ("Structure", person.organization.name if person.organization else None),
                    ("Contact", ", ".join(t.value for t in person.telecoms) or None),
                ]
            )
        )
        return self.add(res)

    # -- stay --------------------------------------------------------------------------------------
    def encounter(self) -> Json | None:
        stay = self.letter.stay
        if stay is None:
            return None
        res = self._new("Encounter", self.doc_key, "stay")
        if stay.ids:
            res["identifier"] = [_identifier(i) for i in stay.ids]
        res["status"] = "finished" if stay.end else "in-progress"
        res["class"] = {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": stay.encounter_class,
            "display": _CLASS_DISPLAY.get(stay.encounter_class, stay.encounter_class),
        }
        if stay.facility_type:
            res["type"] = [_concept(stay.facility_type)]
        res["subject"] = _ref(self.patient_res)
        period = _period(stay.start, stay.end)
        if period:
            res["period"] = period
        hospitalization: Json = {}
        admit = _concept(stay.admit_mode)
        if admit:
            hospitalization["admitSource"] = admit
        discharge = _concept(stay.discharge_mode)
        if discharge:
            hospitalization["dischargeDisposition"] = discharge
        if hospitalization:
            res["hospitalization"] = hospitalization
        facility = self.organization(stay.facility) or self.organization(self.letter.custodian)
        if facility:
            res["serviceProvider"] = _ref(facility, facility.get("name"))
        res["text"] = nv.generated(
            nv.dl(
                [
                    ("Séjour", f"du {_time(stay.start) or '?'} au {_time(stay.end) or '?'}"),
                    ("Établissement", facility.get("name") if facility else None),
                    ("Mode d'entrée", stay.admit_mode.text),
                    ("Mode de sortie", stay.discharge_mode.text),
                ]
            )
        )
        self.encounter_res = self.add(res)
        return res

    # -- medications -------------------------------------------------------------------------------
    def statement(self, line: MedicationLine, status: str, source: Letter) -> Json:
        doc_key = f"{source.doc_id.system}|{source.doc_id.value}"
        res = self._new("MedicationStatement", doc_key, line.key)
        res["status"] = status
        res["category"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/medication-statement-category",
                    "code": "community" if line.section in (MedSection.DISCHARGE, MedSection.CURRENT) else "inpatient",
                }
            ],
            "text": _SECTION_LABEL[line.section],
        }
        if line.section is MedSection.ADMISSION:
            res["category"]["coding"][0]["code"] = "community"
        res["medicationCodeableConcept"] = _concept(line.product, line.name) or {"text": line.name}
        res["subject"] = _ref(self.patient_res)
        if source is self.letter and self.encounter_res is not None:
            res["context"] = _ref(self.encounter_res)
        period = _period(line.start, line.end)
        if period:
            res["effectivePeriod"] = period
        if source.date:
            res["dateAsserted"] = source.date.value
        if line.indication:
            res["reasonCode"] = [_concept(line.indication)]
        if line.section is MedSection.STOPPED and line.comment:
            res["statusReason"] = [{"text": line.comment}]
        notes = [t for t in (line.comment, line.instructions) if t]
        if notes:
            res["note"] = [{"text": t} for t in notes]
        dosage = self.dosage(line)
        if dosage:
            res["dosage"] = [dosage]
        res["text"] = nv.generated(
            nv.dl(
                [
                    ("Médicament", line.name),
                    ("Liste", _SECTION_LABEL[line.section]),
                    ("Posologie", self.dosage_text(line) or None),
                    ("Début", _time(line.start)),
                    ("Fin", _time(line.end)),
                    ("Commentaire", line.comment),
                ]
            )
        )
        self.out.statement_of[line.key] = res["id"]
        return self.add(res)

    def dosage(self, line: MedicationLine) -> Json | None:
        out: Json = {}
        text = self.dosage_text(line)
        if text:
            out["text"] = text
        if line.instructions:
            out["patientInstruction"] = line.instructions
        if line.timing and (line.timing.period is not None or line.timing.when):
            repeat: Json = {}
            if line.timing.period is not None and line.timing.period_unit:
                repeat["frequency"] = line.timing.frequency or 1
                repeat["period"] = _num(line.timing.period)
                repeat["periodUnit"] = line.timing.period_unit
            if line.timing.when:
                repeat["when"] = list(line.timing.when)
            if repeat:
                out["timing"] = {"repeat": repeat}
        route = _concept(line.route)
        if route:
            out["route"] = route
        if line.dose:
            if line.dose_high and line.dose_high.value != line.dose.value:
                out["doseAndRate"] = [{"doseRange": {"low": _quantity(line.dose), "high": _quantity(line.dose_high)}}]
            else:
                out["doseAndRate"] = [{"doseQuantity": _quantity(line.dose)}]
        if line.max_dose:
            out["maxDosePerPeriod"] = {
                "numerator": _quantity(line.max_dose.numerator),
                "denominator": _quantity(line.max_dose.denominator),
            }
        return out or None

    def change_extension(self, change: Change) -> Json:
        entry = self.mappings.code("medication-change").lookup(change.status.value)
        assert isinstance(entry, dict)
        status_coding: Json = (
            {"system": CS_INTEROP, "code": entry["interop"], "display": entry["label"]}
            if entry["interop"]
            else {"system": CS_CHANGE, "code": "unknown", "display": entry["label"]}
        )
        parts: list[Json] = [
            {"url": "status", "valueCoding": status_coding},
            {"url": "basis", "valueCode": change.basis.value},
        ]
        if change.matched_by:
            parts.append({"url": "matchedBy", "valueCode": change.matched_by})
        if (
            change.before is not None
            and change.before.key in self.out.statement_of
            and change.before is not change.line
        ):
            parts.append(
                {"url": "before", "valueReference": {"reference": urn(self.out.statement_of[change.before.key])}}
            )
        if change.reason:
            parts.append({"url": "reason", "valueString": change.reason})
        parts.extend({"url": "note", "valueString": n} for n in change.notes)
        return {"url": EXT_CHANGE, "extension": parts}

    def medications(self, changes: Sequence[Change], prior: Letter | None) -> Json | None:
        letter = self.letter
        statements: dict[str, Json] = {}
        row_subjects = {c.line.key for c in changes}
        for line in letter.medications:
            status = "stopped" if line.section is MedSection.STOPPED else "active"
            if line.key in row_subjects:
                entry = self.mappings.code("medication-change").lookup(
                    next(c.status.value for c in changes if c.line.key == line.key)
                )
                assert isinstance(entry, dict)
                status = entry["status"]
            statements[line.key] = self.statement(line, status, letter)
        if prior is not None:
            for line in prior.medications:
                derived_stop = any(c.line.key == line.key for c in changes)
                statements[line.key] = self.statement(line, "stopped" if derived_stop else "active", prior)
        if not changes and not letter.has_discharge_list and not letter.medications:
            return None
        list_entries: list[Json] = []
        for change in changes:
            res = statements[change.line.key]
            res.setdefault("extension", []).append(self.change_extension(change))
            derived = [
                {"reference": urn(statements[b.key]["id"])}
                for b in (change.before, *change.related)
                if b is not None and b is not change.line and b.key in statements
            ]
            if derived:
                res["derivedFrom"] = derived
            entry = self.mappings.code("medication-change").lookup(change.status.value)
            assert isinstance(entry, dict)
            flag: Json = (
                {
                    "coding": [{"system": CS_FLAG, "code": entry["flag"], "display": entry["flag_display"]}],
                    "text": entry["label"],
                }
                if entry["flag"]
                else {
                    "coding": [{"system": CS_CHANGE, "code": "unknown", "display": entry["flag_display"]}],
                    "text": entry["label"],
                }
            )
            list_entries.append({"flag": flag, "item": {"reference": urn(res["id"]), "display": change.line.name}})
        lst = self._new("List", self.doc_key, "medication-changes")
        lst["status"] = "current"
        lst["mode"] = "changes"
        lst["title"] = "Modifications du traitement médicamenteux"
        lst["code"] = {
            "coding": [{"system": CS_LIST, "code": "medication-changes", "display": "Medication changes"}],
            "text": "Modifications du traitement médicamenteux",
        }
        lst["subject"] = _ref(self.patient_res)
        if self.encounter_res is not None:
            lst["encounter"] = _ref(self.encounter_res)
        if letter.date:
            lst["date"] = letter.date.value
        if self.author_role is not None:
            lst["source"] = _ref(self.author_role)
        notes = []
        if prior is None and not letter.has_admission_list:
            notes.append(
                "Aucune liste d'admission fournie : le caractère nouveau, modifié ou poursuivi des traitements "
                "de sortie est inconnu (statut 'unknown'), seuls les arrêts déclarés par la lettre sont connus."
            )
        if notes:
            lst["note"] = [{"text": n} for n in notes]
        if list_entries:
            lst["entry"] = list_entries
        else:
            lst["emptyReason"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "nilknown"}]
            }
        lst["text"] = nv.generated(self.change_table(changes), *(nv.para(n) for n in notes))
        self.out.changes = list(changes)
        self.list_res = self.add(lst)
        return lst

    def change_rows(self, changes: Sequence[Change]) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for c in changes:
            entry = self.mappings.code("medication-change").lookup(c.status.value)
            assert isinstance(entry, dict)
            before = self.dosage_text(c.before) if c.before is not None else "—"
            if c.before is not None and c.before.name != c.line.name:
                before = f"{c.before.name} : {before}"
            after = self.dosage_text(c.after) if c.after is not None else "—"
            label = (
                entry["label"] + {Basis.STATED: " (déclaré)", Basis.DERIVED: " (déduit)", Basis.UNKNOWN: ""}[c.basis]
            )
            reason = c.reason or ("motif non précisé dans la lettre" if c.status is Status.STOPPED else "—")
            rows.append((c.line.name, before or "—", after or "—", label, reason))
        return rows

    def change_table(self, changes: Sequence[Change]) -> str:
        """The XHTML change table (made once: the List's narrative and the GP summary both show it)."""
        if self._change_table is not None and self._change_table[0] is changes:
            return self._change_table[1]
        table = nv.table(
            ("Médicament", "Avant", "Après", "Changement", "Motif"),
            self.change_rows(changes),
            caption="Modifications du traitement médicamenteux",
        )
        self._change_table = (changes, table)
        return table

    # -- other clinical content --------------------------------------------------------------------
    def observation(self, obs: Observation) -> Json:
        res = self._new("Observation", self.doc_key, obs.key)
        res["status"] = "final"
        res["code"] = _concept(obs.code) or {"text": "observation"}
        res["subject"] = _ref(self.patient_res)
        if self.encounter_res is not None:
            res["encounter"] = _ref(self.encounter_res)
        if self.letter.date:
            res["effectiveDateTime"] = self.letter.date.value
        value = obs.value
        if isinstance(value, bool):
            res["valueBoolean"] = value
        elif isinstance(value, Concept):
            res["valueCodeableConcept"] = _concept(value)
        elif isinstance(value, str):
            res["valueString"] = value
        else:
            res["dataAbsentReason"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]
            }
        shown = (
            value.text
            if isinstance(value, Concept)
            else ("oui" if value is True else "non" if value is False else value)
        )
        res["text"] = nv.generated(
            nv.dl([(obs.code.text or obs.code.codings[0].code, str(shown) if shown is not None else None)])
        )
        return self.add(res)

    def allergy(self, allergy: Allergy) -> Json:
        res = self._new("AllergyIntolerance", self.doc_key, allergy.key)
        res["clinicalStatus"] = {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}
            ]
        }
        res["verificationStatus"] = {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}
            ]
        }
        res["code"] = _concept(allergy.substance, allergy.substance.text or allergy.text) or {
            "text": allergy.text or "allergie (non précisée)"
        }
        if allergy.none:
            res.pop("clinicalStatus")  # IPS: a "no known allergy" statement has no clinical status
        res["patient"] = _ref(self.patient_res)
        if allergy.reaction:
            res["reaction"] = [{"manifestation": [{"text": allergy.reaction}]}]
        res["text"] = nv.generated(
            nv.dl([("Allergie", res["code"].get("text")), ("Type", allergy.code.text), ("Réaction", allergy.reaction)])
        )
        return self.add(res)

    def device(self, device: Device) -> Json:
        dev = self._new("Device", self.doc_key, device.key)
        if device.udi:
            dev["udiCarrier"] = [{"carrierHRF": device.udi}]
        dev["type"] = _concept(device.code, device.text) or {"text": "dispositif"}
        dev["patient"] = _ref(self.patient_res)
        dev["text"] = nv.generated(nv.dl([("Dispositif", dev["type"].get("text")), ("UDI", device.udi)]))
        self.add(dev)
        use = self._new("DeviceUseStatement", self.doc_key, device.key)
        use["status"] = "active"
        use["subject"] = _ref(self.patient_res)
        use["device"] = _ref(dev)
        use["text"] = nv.generated(nv.dl([("Dispositif porté", dev["type"].get("text"))]))
        return self.add(use)

    # -- plan --------------------------------------------------------------------------------------
    def careplan(self) -> Json | None:
        letter = self.letter
        if not letter.plan:
            return None
        res = self._new("CarePlan", self.doc_key, "careplan")
        res["status"] = "active"
        res["intent"] = "plan"
        res["category"] = [
            {
                "coding": [{"system": "http://loinc.org", "code": "18776-5", "display": "Plan of care note"}],
                "text": "Suites à donner",
            }
        ]
        res["title"] = "Suites à donner après la sortie"
        res["subject"] = _ref(self.patient_res)
        if self.encounter_res is not None:
            res["encounter"] = _ref(self.encounter_res)
        if letter.date:
            res["created"] = letter.date.value
        if self.author_role is not None:
            res["author"] = _ref(self.author_role)
        activities: list[Json] = []
        rows: list[tuple[str, str, str]] = []
        for item in letter.plan:
            activity, row = self.activity(item)
            activities.append(activity)
            rows.append(row)
        res["activity"] = activities
        res["text"] = nv.generated(nv.table(("Action", "Quand", "Par qui"), rows, caption="Suites à donner"))
        self.careplan_res = self.add(res)
        return res

    def activity(self, item: PlanItem) -> tuple[Json, tuple[str, str, str]]:
        detail: Json = {"status": "not-started"}
        detail["kind"] = {"act": "ServiceRequest", "request": "ServiceRequest", "encounter": "Appointment"}.get(
            item.kind, "Task"
        )
        code = _concept(item.code)
        if code:
            detail["code"] = code
        detail["description"] = item.text
        period = _period(item.start, item.end)
        if period:
            detail["scheduledPeriod"] = period
        performer = self.performer(item.performer)
        who = ""
        if performer is not None:
            name = (
                performer.get("name")
                if performer["resourceType"] == "Organization"
                else (performer.get("practitioner", {}).get("display"))
            )
            detail["performer"] = [_ref(performer, name)]
            self.member(performer, ROLE_PERFORMER, "Intervenant du plan de soins")
            who = name or ""
        priority = item.priority.codings[0].code if item.priority.codings else None
        mapped = self.mappings.code("priority").lookup(priority) if priority else None
        if mapped:
            detail["extension"] = [
                {"url": "http://hl7.org/fhir/StructureDefinition/request-priority", "valueCode": str(mapped)}
            ]
        when = " – ".join(filter(None, (_time(item.start), _time(item.end))))
        return {"id": f"activity-{item.key.replace('.', '-')}", "detail": detail}, (item.text, when or "—", who or "—")

    # -- provenance and the original --------------------------------------------------------------
    def document_reference(self, raw: bytes, media_type: str) -> Json:
        import base64

        letter = self.letter
        res = self._new("DocumentReference", self.doc_key, "original")
        res["masterIdentifier"] = {"system": letter.doc_id.system, "value": letter.doc_id.value}
        if letter.set_id:
            ident = {"system": letter.set_id.system, "value": letter.set_id.value}
            res["identifier"] = [ident]
        res["status"] = "current"
        res["docStatus"] = letter.status or "final"
        res["type"] = _concept(letter.doc_type) or {"text": letter.title}
        res["subject"] = _ref(self.patient_res)
        if letter.date:
            res["date"] = _instant(letter.date)
        if self.author_role is not None:
            res["author"] = [_ref(self.author_role)]
        custodian = self.organization(letter.custodian)
        if custodian:
            res["custodian"] = _ref(custodian)
        res["description"] = letter.title
        if letter.confidentiality:
            res["securityLabel"] = [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                            "code": letter.confidentiality,
                        }
                    ]
                }
            ]
        res["content"] = [
            {
                "attachment": {
                    "contentType": media_type,
                    "data": base64.b64encode(raw).decode("ascii"),
                    "title": letter.title,
                    "size": len(raw),
                }
            }
        ]
        if letter.attachment is not None:
            kind, data = letter.attachment
            res["content"].append(
                {
                    "attachment": {
                        "contentType": kind,
                        "data": base64.b64encode(data).decode("ascii"),
                        "title": f"{letter.title} (document)",
                        "size": len(data),
                    }
                }
            )
        if self.encounter_res is not None:
            res["context"] = {"encounter": [_ref(self.encounter_res)]}
        res["text"] = nv.generated(nv.dl([("Document d'origine", letter.title), ("Version", str(letter.version or 1))]))
        self.docref = self.add(res)
        return res

    def provenance(self, recorded: str) -> Json:
        res = self._new("Provenance", self.doc_key, "translation")
        res["target"] = [{"reference": urn(r["id"])} for r in self.out.resources]
        res["recorded"] = recorded
        res["activity"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "DERIVE",
                    "display": "derive",
                }
            ]
        }
        agent: Json = {
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "assembler"}
                ]
            },
            "who": {"display": "discharge-gateway"},
        }
        res["agent"] = [agent]
        if self.author_role is not None:
            res["agent"].append(
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "author",
                            }
                        ]
                    },
                    "who": _ref(self.author_role),
                }
            )
        if self.docref is not None:
            res["entity"] = [{"role": "source", "what": _ref(self.docref, self.letter.title)}]
        res["text"] = nv.generated(
            nv.para(f"Traduit de « {self.letter.title} » ({self.letter.format}) par la passerelle.")
        )
        return self.add(res)

    def outcome(self) -> Json | None:
        if not self.issues:
            return None
        res = self._new("OperationOutcome", self.doc_key, "translation-issues")
        res["issue"] = [
            {
                "severity": i.severity,
                "code": i.code,
                "diagnostics": i.text,
                **({"location": [i.where]} if i.where else {}),
            }
            for i in self.issues
        ]
        res["text"] = nv.generated(
            nv.table(
                ("Gravité", "Constat", "Où"),
                ((i.severity, i.text, i.where or "—") for i in self.issues),
                caption="Points d'attention de la traduction",
            )
        )
        return self.add(res)

    # -- the GP's readable summary -----------------------------------------------------------------
    def communication(self, changes: Sequence[Change], gp_role: Json | None) -> Json:
        letter = self.letter
        res = self._new("Communication", self.doc_key, "gp-summary")
        res["status"] = "completed"
        res["category"] = [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "notification"}
                ],
                "text": "Lettre de liaison de sortie",
            }
        ]
        res["subject"] = _ref(self.patient_res)
        if self.encounter_res is not None:
            res["encounter"] = _ref(self.encounter_res)
        about = [r for r in (self.list_res, self.careplan_res, self.docref) if r is not None]
        res["about"] = [_ref(r) for r in about]
        if letter.date:
            res["sent"] = letter.date.value
        if gp_role is not None:
            res["recipient"] = [_ref(gp_role, gp_role.get("practitioner", {}).get("display"))]
        else:
            self.issues.append(
                Issue("warning", "incomplete", "the letter names no médecin traitant: the summary has no addressee")
            )
        if self.author_role is not None:
            res["sender"] = _ref(self.author_role)
        payload: list[Json] = []
        blocks: list[str] = []
        if changes or letter.has_discharge_list:
            table = self.change_table(changes)
            blocks.append(table)
            payload.append(_xhtml_payload("change-table", "Modifications du traitement médicamenteux", table))
        if self.careplan_res is not None:
            plan = self.careplan_res["text"]["div"]
            inner = plan[plan.index(">") + 1 : plan.rindex("</div>")]
            blocks.append(inner)
            payload.append(_xhtml_payload("follow-up-plan", "Suites à donner", inner))
        for section in letter.sections:
            payload.append(
                {"id": f"section-{_slug(section.code.code)}", "contentString": f"{section.title} : {section.text}"}
            )
            blocks.append(f"<h3>{nv.esc(section.title)}</h3>{nv.para(section.text)}")
        if letter.stay and (letter.stay.end or letter.stay.discharge_mode):
            text = f"Sortie le {_time(letter.stay.end) or '?'}"
            if letter.stay.discharge_mode.text:
                text += f" — {letter.stay.discharge_mode.text}"
            payload.append({"id": "return-home", "contentString": text})
            blocks.append(nv.para(text))
        contacts = _contacts(letter)
        if contacts:
            payload.append({"id": "contacts", "contentString": contacts})
            blocks.append(nv.para(contacts))
        for key, target in (("list", self.list_res), ("careplan", self.careplan_res), ("original", self.docref)):
            if target is not None:
                payload.append(
                    {"id": key, "contentReference": _ref(target, target.get("title") or target.get("description"))}
                )
        res["payload"] = payload
        res["text"] = nv.generated(f"<h2>{nv.esc(letter.title)}</h2>", *blocks)
        self.communication_res = self.add(res)
        return res


def _xhtml_payload(payload_id: str, title: str, xhtml: str) -> Json:
    import base64

    document = f'<div xmlns="{nv.XHTML_NS}">{xhtml}</div>'
    data = base64.b64encode(document.encode("utf-8")).decode("ascii")
    return {
        "id": payload_id,
        "contentAttachment": {"contentType": "application/xhtml+xml", "language": "fr", "title": title, "data": data},
    }


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-") or "x"


def _contacts(letter: Letter) -> str | None:
    """Who to call at the hospital: the author and the establishment (not the ward, which is clinical)."""
    author = letter.author
    if author is None:
        return None
    phones = ", ".join(t.value for t in author.telecoms if t.system in ("phone", "email"))
    who = author.name.display() if author.name else "le service"
    place = letter.custodian.name if letter.custodian and letter.custodian.name else None
    return f"Contact hospitalier : {who}" + (f" ({place})" if place else "") + (f" — {phones}" if phones else "")


def _display(resource: Json) -> str | None:
    if resource["resourceType"] == "PractitionerRole":
        return str(resource.get("practitioner", {}).get("display") or "") or None
    if resource["resourceType"] == "RelatedPerson":
        names = resource.get("name") or [{}]
        return str(names[0].get("text") or "") or None
    name = resource.get("name")
    return name if isinstance(name, str) else None


def _instant(point: Timepoint) -> str:
    """DocumentReference.date is an instant: needs seconds and a zone; dates become midnight UTC."""
    value = point.value
    if "T" not in value:
        parts = ([*value.split("-"), "01", "01"])[:3]
        return f"{parts[0]}-{parts[1]}-{parts[2]}T00:00:00Z"
    return value


_CLASS_DISPLAY = {
    "IMP": "inpatient encounter",
    "EMER": "emergency",
    "AMB": "ambulatory",
    "ACUTE": "inpatient acute",
    "NONAC": "inpatient non-acute",
    "SS": "short stay",
    "HH": "home health",
    "OBSENC": "observation encounter",
}

_SECTION_LABEL = {
    MedSection.DISCHARGE: "Traitement à la sortie",
    MedSection.STOPPED: "Traitement arrêté pendant le séjour",
    MedSection.ADMISSION: "Traitement à l'admission",
    MedSection.CURRENT: "Traitement en cours",
}


def build(
    letter: Letter,
    changes: Sequence[Change],
    prior: Letter | None,
    mappings: Mappings,
    *,
    raw: bytes,
    media_type: str,
    recorded: str,
) -> tuple[Built, list[Issue]]:
    """All resources for one letter, in a stable order, plus the issues to report."""
    b = _Builder(letter, mappings)
    b.patient()
    for index, person in enumerate(letter.related_persons):
        b.member(b.related(person, index), ROLE_RELATED, person.relationship.text or person.kind.value)
    b.author_role = b.member(b.practitioner_role(letter.author), ROLE_AUTHOR, "Auteur de la lettre")
    gp_role = b.member(b.practitioner_role(letter.gp, "Médecin traitant"), ROLE_GP, "Médecin traitant")
    if gp_role is not None:
        b.patient_res["generalPractitioner"] = [_ref(gp_role, gp_role.get("practitioner", {}).get("display"))]
    for recipient in letter.recipients:
        b.member(b.practitioner_role(recipient), ROLE_RECIPIENT, "Destinataire de la lettre")
    b.practitioner_role(letter.legal_authenticator)
    b.organization(letter.custodian)
    b.encounter()
    b.medications(changes, prior)
    for obs in letter.observations:
        b.observation(obs)
    for allergy in letter.allergies:
        b.allergy(allergy)
    for device in letter.devices:
        b.device(device)
    b.careplan()
    b.care_team()
    b.document_reference(raw, media_type)
    b.communication(changes, gp_role)
    b.provenance(recorded)
    b.outcome()
    return b.out, b.issues
