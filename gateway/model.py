"""Value types that flow between the pipeline's stages.

Every source format (CI-SIS CDA, C-CDA, FHIR document) is read into the same neutral
:class:`Letter`; the FHIR builder and the medication reconciliation only ever see these values, so a
new input format is one adapter and no change downstream.  All values are frozen: a stage returns new
values instead of editing what it was given.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal, TypeVar

__all__ = [
    "Address",
    "Allergy",
    "Code",
    "Concept",
    "Device",
    "Dose",
    "Ident",
    "Issue",
    "Letter",
    "MedSection",
    "MedicationLine",
    "Name",
    "Narrative",
    "Observation",
    "Organization",
    "Patient",
    "PlanItem",
    "Practitioner",
    "Ratio",
    "RelatedPerson",
    "SectionText",
    "SourceDocument",
    "Stay",
    "Telecom",
    "Timepoint",
    "Timing",
]


_T = TypeVar("_T")
_NO_VALUE: Any = object()  # an argument not given, for a field with a default factory


def _slot_init(cls: type[_T]) -> type[_T]:
    """The frozen dataclass with an ``__init__`` that writes each slot through its descriptor.

    The dataclass's own ``__init__`` goes through ``object.__setattr__`` for every field (frozen
    classes must): 1.5 times as long (380 against 240 ns for a :class:`Code`), and a letter makes
    hundreds of these values.  Same signature, defaults, default factories (called per instance) and
    refusals; ``tests/unit/test_prepare_fast.py`` compares both on every class.
    """
    params: list[str] = []
    lines: list[str] = []
    names: dict[str, Any] = {"_NO_VALUE": _NO_VALUE}
    for f in fields(cls):  # type: ignore[arg-type]
        names[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        value = f.name
        if f.default is not MISSING:
            names[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not MISSING:
            names[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_NO_VALUE")
            value = f"_factory_{f.name}() if {f.name} is _NO_VALUE else {f.name}"
        else:
            params.append(f.name)
        lines.append(f"    _set_{f.name}(self, {value})\n")
    exec(f"def __init__(self, {', '.join(params)}):\n{''.join(lines) or '    pass'}", names)
    init = names["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    setattr(cls, "__init__", init)  # noqa: B010 (mypy refuses assigning a method)
    return cls


@_slot_init
@dataclass(frozen=True, slots=True)
class SourceDocument:
    """Bytes that passed the ingest checks, with the detected format and the parsed tree."""

    format: str  # registry key, e.g. "cda-fr-ldl-ses", "ccda", "fhir-document"
    media_type: str
    raw: bytes
    name: str
    tree: object  # lxml root element or a parsed JSON dict, depending on the format


@_slot_init
@dataclass(frozen=True, slots=True)
class Issue:
    """Something the reader of the output must know: an ambiguity, an assumption, a gap."""

    severity: Literal["information", "warning", "error"]
    code: str  # FHIR issue-type code
    text: str
    where: str = ""


@_slot_init
@dataclass(frozen=True, slots=True)
class Code:
    system: str
    code: str
    display: str | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class Concept:
    codings: tuple[Code, ...] = ()
    text: str | None = None

    def first(self, system: str) -> Code | None:
        return next((c for c in self.codings if c.system == system), None)

    def __bool__(self) -> bool:
        return bool(self.codings or self.text)


@_slot_init
@dataclass(frozen=True, slots=True)
class Ident:
    system: str
    value: str
    type_code: str | None = None  # code in fr-core-cs-v2-0203 / v2-0203
    use: str | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class Name:
    use: str  # FHIR name-use: official (birth name), usual (used name), ...
    family: str | None = None
    given: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    text: str | None = None

    def display(self) -> str:
        parts = [*self.prefix, *self.given, self.family or ""]
        return self.text or " ".join(p for p in parts if p)


@_slot_init
@dataclass(frozen=True, slots=True)
class Telecom:
    system: str  # phone | email | fax | url
    value: str
    use: str | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class Address:
    lines: tuple[str, ...] = ()
    city: str | None = None
    postal_code: str | None = None
    country: str | None = None
    use: str | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class Timepoint:
    """A FHIR date or dateTime string, plus whether its time zone was assumed."""

    value: str
    zone_assumed: bool = False


@_slot_init
@dataclass(frozen=True, slots=True)
class Organization:
    ids: tuple[Ident, ...] = ()
    name: str | None = None
    type: Concept = field(default_factory=Concept)
    telecoms: tuple[Telecom, ...] = ()
    addresses: tuple[Address, ...] = ()


@_slot_init
@dataclass(frozen=True, slots=True)
class Practitioner:
    ids: tuple[Ident, ...] = ()
    name: Name | None = None
    role: Concept = field(default_factory=Concept)  # profession / function (e.g. G15_10/SM26, PCP)
    telecoms: tuple[Telecom, ...] = ()
    addresses: tuple[Address, ...] = ()
    organization: Organization | None = None


class RelationKind(StrEnum):
    GUARDIAN = "guardian"  # legal representative
    TRUSTED = "trusted-person"  # personne de confiance
    EMERGENCY = "emergency-contact"  # personne à prévenir
    OTHER = "other"


@_slot_init
@dataclass(frozen=True, slots=True)
class RelatedPerson:
    kind: RelationKind
    name: Name | None = None
    relationship: Concept = field(default_factory=Concept)
    telecoms: tuple[Telecom, ...] = ()
    addresses: tuple[Address, ...] = ()
    organization: Organization | None = None  # e.g. the association exercising a tutelle


@_slot_init
@dataclass(frozen=True, slots=True)
class Patient:
    ids: tuple[Ident, ...]
    names: tuple[Name, ...] = ()
    gender: str | None = None
    birth_date: str | None = None
    telecoms: tuple[Telecom, ...] = ()
    addresses: tuple[Address, ...] = ()


@_slot_init
@dataclass(frozen=True, slots=True)
class Stay:
    start: Timepoint | None = None
    end: Timepoint | None = None
    facility: Organization | None = None
    facility_type: Concept = field(default_factory=Concept)
    admit_mode: Concept = field(default_factory=Concept)
    discharge_mode: Concept = field(default_factory=Concept)
    ids: tuple[Ident, ...] = ()
    encounter_class: str = "IMP"  # v3 ActEncounterCode: IMP inpatient, EMER emergency, AMB, SS short stay...


@_slot_init
@dataclass(frozen=True, slots=True)
class Dose:
    value: Decimal
    unit: str | None = None  # UCUM or annotation unit as written ({tbl}, mg)
    text: str | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class Ratio:
    numerator: Dose
    denominator: Dose


@_slot_init
@dataclass(frozen=True, slots=True)
class Timing:
    period: Decimal | None = None
    period_unit: str | None = None  # FHIR units-of-time code: s min h d wk mo a
    frequency: int | None = None
    when: tuple[str, ...] = ()  # FHIR event-timing codes (EIVL), e.g. MORN, ACM
    text: str | None = None


class MedSection(StrEnum):
    """Which list of the letter a medication line comes from."""

    DISCHARGE = "discharge"  # 10183-2 Traitements à la sortie / C-CDA discharge medications
    STOPPED = "stopped"  # 18610-6 Traitements arrêtés durant le séjour
    ADMISSION = "admission"  # 42346-7 Traitements à l'admission (entry letter, --prior)
    CURRENT = "current"  # 10160-0 history of medication use (VSM, CCD)


@_slot_init
@dataclass(frozen=True, slots=True)
class Narrative:
    """The narrative row of a medication line: cells by normalised header, and the row's text."""

    cells: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def cell(self, *headers: str) -> str | None:
        for key, value in self.cells:
            if key in headers and value:
                return value
        return None


@_slot_init
@dataclass(frozen=True, slots=True)
class MedicationLine:
    section: MedSection
    key: str  # unique within the letter: section + position (entry ids are reused in real letters)
    product: Concept
    name: str
    ids: tuple[Ident, ...] = ()
    dose: Dose | None = None
    dose_high: Dose | None = None
    timing: Timing | None = None
    route: Concept = field(default_factory=Concept)
    start: Timepoint | None = None
    end: Timepoint | None = None
    max_dose: Ratio | None = None
    comment: str | None = None  # the "Commentaire" cell: the reason, kept attached to its line
    instructions: str | None = None
    narrative: Narrative = field(default_factory=Narrative)
    indication: Concept = field(default_factory=Concept)
    mood: str = "EVN"
    stated_status: str | None = None  # a change status the source states explicitly (FHIR inputs)

    def dosage_text(self) -> str:
        """The posology as a prescriber would read it: '1 {tbl} · 2/d · voie orale'."""
        parts: list[str] = []
        if self.narrative.cell("posologie"):
            return self.narrative.cell("posologie") or ""
        if self.narrative.cell("dose"):
            parts.append(self.narrative.cell("dose") or "")
        elif self.dose is not None:
            parts.append(_dose_text(self.dose, self.dose_high))
        if self.narrative.cell("frequence", "rythme admin"):
            parts.append(self.narrative.cell("frequence", "rythme admin") or "")
        elif self.timing is not None and self.timing.text:
            parts.append(self.timing.text)
        if self.narrative.cell("voie admin"):
            parts.append(self.narrative.cell("voie admin") or "")
        elif self.route.text or self.route.codings:
            parts.append(self.route.text or (self.route.codings[0].display or self.route.codings[0].code))
        text = " · ".join(p for p in parts if p)
        return text or (self.instructions or "")


def _dose_text(dose: Dose, high: Dose | None) -> str:
    if dose.text:
        return dose.text
    value = f"{dose.value.normalize():f}"
    if high is not None and high.value != dose.value:
        value = f"{value}–{high.value.normalize():f}"
    return f"{value} {dose.unit}".strip() if dose.unit and dose.unit != "1" else value


@_slot_init
@dataclass(frozen=True, slots=True)
class PlanItem:
    """One thing to do after discharge: an act, a follow-up request, a planned encounter, home help."""

    kind: Literal["act", "request", "encounter", "narrative"]
    key: str
    text: str
    code: Concept = field(default_factory=Concept)
    priority: Concept = field(default_factory=Concept)
    start: Timepoint | None = None
    end: Timepoint | None = None
    performer: Practitioner | Organization | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class Observation:
    key: str
    code: Concept
    value: str | bool | Concept | None
    text: str | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class Allergy:
    key: str
    code: Concept
    substance: Concept
    text: str | None = None
    reaction: str | None = None
    none: bool = False  # the letter states that there is no known allergy


@_slot_init
@dataclass(frozen=True, slots=True)
class Device:
    key: str
    code: Concept
    text: str | None = None
    udi: str | None = None


@_slot_init
@dataclass(frozen=True, slots=True)
class SectionText:
    """A section the letter carries as narrative only (motif, awaited results, hospital course...)."""

    code: Code
    title: str
    text: str


@_slot_init
@dataclass(frozen=True, slots=True)
class Letter:
    """Everything a discharge letter says, independent of its source format."""

    format: str
    doc_type: Concept
    doc_id: Ident
    patient: Patient
    title: str = ""
    set_id: Ident | None = None
    version: int | None = None
    date: Timepoint | None = None
    confidentiality: str | None = None
    status: str | None = None  # FHIR composition-status: preliminary | final (CI-SIS "Statut du document")
    language: str | None = None
    template_version: str | None = None
    related_persons: tuple[RelatedPerson, ...] = ()
    author: Practitioner | None = None
    custodian: Organization | None = None
    legal_authenticator: Practitioner | None = None
    recipients: tuple[Practitioner, ...] = ()
    gp: Practitioner | None = None
    stay: Stay | None = None
    medications: tuple[MedicationLine, ...] = ()
    plan: tuple[PlanItem, ...] = ()
    observations: tuple[Observation, ...] = ()
    allergies: tuple[Allergy, ...] = ()
    devices: tuple[Device, ...] = ()
    sections: tuple[SectionText, ...] = ()
    issues: tuple[Issue, ...] = ()
    has_discharge_list: bool = False
    has_stopped_list: bool = False
    has_admission_list: bool = False
    attachment: tuple[str, bytes] | None = None  # an unstructured body (PDF...): media type and bytes
