"""Derive the medication-change table: one row per drug, with its status and where the status came from.

A CI-SIS letter never codes the change (standards.md §A.7): its discharge list (10183-2) and its
stopped list (18610-6) are two plain lists.  The status of each line is therefore *derived* by
comparing them with each other and with an admission list when one is given, and *stated* only
when the source says it (a line in the stopped section is stated as stopped; a FHIR input may carry
an explicit reconciliation status).  Without an admission list, whether a discharge line is new is
*unknown*, and the row says so rather than guessing.

Lines are matched in passes, strongest first, each line used at most once: CIS, then CIP, then ATC
(a different product with the same substance: equivalence, or a strength change of the same brand),
then the normalised name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.model import Code, MedicationLine, MedSection
from gateway.text import fold

__all__ = ["Basis", "Change", "Status", "reconcile"]

CIS = "urn:oid:1.2.250.1.213.2.3.1"
CIP = "urn:oid:1.2.250.1.213.2.3.2"
ATC = "http://www.whocc.no/atc"
CIS_SYSTEMS = (CIS, "https://smt.esante.gouv.fr/terminologie-cis", "http://data.esante.gouv.fr/ansm/medicament/CIS")
CIP_SYSTEMS = (CIP, "https://smt.esante.gouv.fr/terminologie-bdpm", "http://data.esante.gouv.fr/ansm/medicament/CIP")
ATC_SYSTEMS = (ATC, "https://smt.esante.gouv.fr/terminologie-atc", "urn:oid:2.16.840.1.113883.6.73")


class Status(StrEnum):
    CONTINUED = "continued"
    EQUIVALENCE = "equivalence"
    STOPPED = "stopped"
    MODIFIED = "modified"
    INITIATED = "initiated"
    UNKNOWN = "unknown"


class Basis(StrEnum):
    STATED = "stated"  # the source says it
    DERIVED = "derived"  # computed by comparing lists
    UNKNOWN = "unknown"  # cannot be known from what was given


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change table: drug · before · after · change · reason."""

    line: MedicationLine  # the line the row is about (after, or the stopped/admission line)
    status: Status
    basis: Basis
    before: MedicationLine | None = None
    after: MedicationLine | None = None
    matched_by: str | None = None
    reason: str | None = None
    notes: tuple[str, ...] = ()
    related: tuple[MedicationLine, ...] = ()  # other lines folded into this row (e.g. the old dose stopped)


def _code(line: MedicationLine, systems: Sequence[str]) -> str | None:
    for coding in line.product.codings:
        if coding.system in systems:
            return coding.code.strip().upper()
    return None


def _name(line: MedicationLine) -> str | None:
    return fold(line.name) or None


def _brand(line: MedicationLine) -> str | None:
    """The name up to the first digit: 'kardegic 160 mg' → 'kardegic'."""
    folded = fold(line.name)
    words: list[str] = []
    for word in folded.split():
        if word[0].isdigit():
            break
        words.append(word)
    return " ".join(words) or None


_PASSES: tuple[tuple[str, Callable[[MedicationLine], str | None]], ...] = (
    ("cis", lambda line: _code(line, CIS_SYSTEMS)),
    ("cip", lambda line: _code(line, CIP_SYSTEMS)),
    ("atc", lambda line: _code(line, ATC_SYSTEMS)),
    ("name", _name),
)


def _pair(
    lines: Sequence[MedicationLine], candidates: Sequence[MedicationLine]
) -> dict[str, tuple[MedicationLine, str]]:
    """Match each line to at most one candidate, strongest key first; result keyed by line.key."""
    found: dict[str, tuple[MedicationLine, str]] = {}
    taken: set[str] = set()
    for how, key_of in _PASSES:
        index: dict[str, list[MedicationLine]] = {}
        for cand in candidates:
            key = key_of(cand)
            if key and cand.key not in taken:
                index.setdefault(key, []).append(cand)
        for line in lines:
            if line.key in found:
                continue
            key = key_of(line)
            pool = [c for c in index.get(key, []) if c.key not in taken] if key else []
            if pool:
                found[line.key] = (pool[0], how)
                taken.add(pool[0].key)
    return found


def _unit(unit: str | None) -> str:
    """UCUM annotations ({tbl}, {count}...) and "1" all mean one unit of presentation."""
    if unit is None or unit == "1" or (unit.startswith("{") and unit.endswith("}")):
        return "1"
    return fold(unit)


def _posology(line: MedicationLine) -> tuple[object, ...] | None:
    """What must be equal for a line to be 'unchanged'; None when the line states no posology.

    The maximum dose is compared separately (:func:`_compare`): letters often give it on one side only.
    """
    high = line.dose_high if line.dose_high and (not line.dose or line.dose_high.value != line.dose.value) else None
    structured = (
        (line.dose.value.normalize(), _unit(line.dose.unit)) if line.dose else None,
        (high.value.normalize(), _unit(high.unit)) if high else None,
        (
            (line.timing.period.normalize() if line.timing.period is not None else None),
            line.timing.period_unit,
            line.timing.frequency,
            line.timing.when,
        )
        if line.timing
        else None,
    )
    if any(part is not None for part in structured):
        return structured
    text = fold(" ".join(filter(None, (line.narrative.cell("dose"), line.narrative.cell("frequence")))))
    return (text,) if text else None


def _ratio(line: MedicationLine) -> tuple[object, ...] | None:
    if line.max_dose is None:
        return None
    num, den = line.max_dose.numerator, line.max_dose.denominator
    return (num.value.normalize(), _unit(num.unit), den.value.normalize(), _unit(den.unit))


def _routes(line: MedicationLine) -> set[tuple[str, str]]:
    return {(c.system, c.code) for c in line.route.codings}


def _compare(after: MedicationLine, before: MedicationLine, how: str) -> tuple[Status, list[str]]:
    notes: list[str] = []
    same_brand = _brand(after) is not None and _brand(after) == _brand(before)
    if how == "atc" and not same_brand:
        status = Status.EQUIVALENCE
        notes.append(f"other product with the same substance (ATC {_code(after, ATC_SYSTEMS)})")
        if _posology(after) != _posology(before):
            notes.append("posology differs too")
        return status, notes
    if how == "atc":
        notes.append("same brand, other strength or presentation (matched by ATC and name)")
        return Status.MODIFIED, notes
    if how == "name":
        notes.append("matched by drug name only (no common code)")
    a_pos, b_pos = _posology(after), _posology(before)
    if a_pos is None or b_pos is None:
        notes.append("posology missing on one side: a dose change cannot be excluded")
        return Status.CONTINUED, notes
    if a_pos != b_pos:
        return Status.MODIFIED, notes
    if after.max_dose and before.max_dose and _ratio(after) != _ratio(before):
        notes.append("maximum dose changed")
        return Status.MODIFIED, notes
    ra, rb = _routes(after), _routes(before)
    if ra and rb and ra != rb:
        notes.append("route changed")
        return Status.MODIFIED, notes
    return Status.CONTINUED, notes


def _reasons(*lines: MedicationLine | None) -> str | None:
    seen: list[str] = []
    for line in lines:
        if line is not None and line.comment and line.comment not in seen:
            seen.append(line.comment)
    return " / ".join(seen) or None


def reconcile(letter_lines: Sequence[MedicationLine], prior: Sequence[MedicationLine] | None) -> list[Change]:
    """Build the change rows for a letter's lines, given an admission list (``prior``) or None."""
    discharge = [m for m in letter_lines if m.section is MedSection.DISCHARGE]
    stopped = [m for m in letter_lines if m.section is MedSection.STOPPED]
    if not discharge and not stopped:
        # a document with only a current list (CCD, VSM): its lines are what the patient takes now
        discharge = [m for m in letter_lines if m.section is MedSection.CURRENT]
    admission = list(prior or ())
    rows: list[Change] = []

    to_admission = _pair(discharge, admission) if admission else {}
    unmatched_discharge = [d for d in discharge if d.key not in to_admission]
    # a stopped line matching a discharge line is the old posology of that drug (dose change)
    stop_to_discharge = _pair(stopped, discharge)
    folded_stops: dict[str, MedicationLine] = {}
    for stop_key, (d_line, _how) in stop_to_discharge.items():
        folded_stops[d_line.key] = next(s for s in stopped if s.key == stop_key)

    for d in discharge:
        stop = folded_stops.get(d.key)
        if d.stated_status:
            rows.append(Change(d, Status(d.stated_status), Basis.STATED, after=d, reason=_reasons(d, stop)))
            continue
        if d.key in to_admission:
            before, how = to_admission[d.key]
            status, notes = _compare(d, before, how)
            if stop is not None and status is Status.CONTINUED:
                notes.append("also listed as stopped during the stay: check the posology")
            rows.append(
                Change(
                    d,
                    status,
                    Basis.DERIVED,
                    before=before,
                    after=d,
                    matched_by=how,
                    reason=_reasons(d, stop),
                    notes=tuple(notes),
                    related=(stop,) if stop else (),
                )
            )
        elif stop is not None:
            how = stop_to_discharge[stop.key][1]
            status, notes = _compare(d, stop, how)
            notes.insert(0, "compared with the posology stopped during the stay")
            if status is Status.CONTINUED:
                notes.append("listed both as stopped and at discharge with the same posology")
            rows.append(
                Change(
                    d,
                    status,
                    Basis.DERIVED,
                    before=stop,
                    after=d,
                    matched_by=how,
                    reason=_reasons(d, stop),
                    notes=tuple(notes),
                    related=(stop,),
                )
            )
        elif admission:
            rows.append(
                Change(
                    d,
                    Status.INITIATED,
                    Basis.DERIVED,
                    after=d,
                    reason=_reasons(d),
                    notes=("not on the admission list",),
                )
            )
        else:
            rows.append(
                Change(
                    d,
                    Status.UNKNOWN,
                    Basis.UNKNOWN,
                    after=d,
                    reason=_reasons(d),
                    notes=(
                        "no admission list was given: whether this line is new, changed or continued cannot be known",
                    ),
                )
            )

    remaining_admission = [a for a in admission if a.key not in {b.key for b, _ in to_admission.values()}]
    free_stops = [s for s in stopped if s.key not in stop_to_discharge]
    stop_to_admission = _pair(free_stops, remaining_admission) if remaining_admission else {}
    for s in free_stops:
        before_how = stop_to_admission.get(s.key)
        rows.append(
            Change(
                s,
                Status.STOPPED,
                Basis.STATED,
                before=before_how[0] if before_how else s,
                matched_by=before_how[1] if before_how else None,
                reason=_reasons(s),
                notes=() if s.comment else ("the letter gives no reason for stopping",),
            )
        )
    used = {b.key for b, _ in stop_to_admission.values()}
    for a in remaining_admission:
        if a.key in used:
            continue
        rows.append(
            Change(
                a,
                Status.STOPPED,
                Basis.DERIVED,
                before=a,
                reason=None,
                notes=(
                    "on the admission list but neither at discharge nor among the stopped drugs: "
                    "assumed stopped, the letter says nothing about it",
                ),
            )
        )
    del unmatched_discharge
    return rows


def product_codes(line: MedicationLine) -> tuple[Code, ...]:
    """The codings the change table shows for a line (CIS, CIP, ATC, others)."""
    return line.product.codings
