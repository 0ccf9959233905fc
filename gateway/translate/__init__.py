"""Stage 2 — translate: a checked source document (and optional prior list) → FHIR R4 resources.

Each input format has one adapter behind :data:`ADAPTERS` that reads it into the neutral
:class:`~gateway.model.Letter`; the medication reconciliation and the resource builder are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import PriorMismatch, Where
from gateway.mappings import Mappings
from gateway.model import Issue, Letter, MedSection, SourceDocument
from gateway.translate.build import Built, build
from gateway.translate.cda import read_cda
from gateway.translate.fhir_document import read_fhir_document, read_fhir_list
from gateway.translate.reconcile import reconcile

__all__ = ["ADAPTERS", "Translation", "read_letter", "translate"]

Adapter = Callable[[SourceDocument, Mappings, str], Letter]


def _cda(doc: SourceDocument, mappings: Mappings, zone: str) -> Letter:
    kind = next(k for k in mappings.documents.cda if k.format == doc.format)
    return read_cda(doc.tree, kind, mappings, doc.name, zone)  # type: ignore[arg-type]


def _fhir_document(doc: SourceDocument, mappings: Mappings, zone: str) -> Letter:
    kind = next(k for k in mappings.documents.fhir if k.format == doc.format)
    return read_fhir_document(doc.tree, kind, mappings, doc.name)  # type: ignore[arg-type]


def _fhir_list(doc: SourceDocument, mappings: Mappings, zone: str) -> Letter:
    return read_fhir_list(doc.tree, doc.format, doc.name)  # type: ignore[arg-type]


ADAPTERS: dict[str, Adapter] = {"cda": _cda, "fhir-document": _fhir_document, "fhir-list": _fhir_list}


@dataclass(frozen=True, slots=True)
class Translation:
    letter: Letter
    built: Built
    issues: tuple[Issue, ...]

    @property
    def resources(self) -> list[dict[str, Any]]:
        return self.built.resources


def read_letter(doc: SourceDocument, mappings: Mappings, zone: str = "Europe/Paris") -> Letter:
    kind = next(k for k in (*mappings.documents.cda, *mappings.documents.fhir) if k.format == doc.format)
    return ADAPTERS[kind.adapter](doc, mappings, zone)


def prior_lines(prior: Letter) -> Letter:
    """A prior document's medication lines, all treated as the admission list."""
    from dataclasses import replace

    wanted = [m for m in prior.medications if m.section in (MedSection.ADMISSION, MedSection.CURRENT)]
    if not wanted:
        wanted = [m for m in prior.medications if m.section is MedSection.DISCHARGE]
    lines = tuple(replace(m, section=MedSection.ADMISSION, key=f"prior.{m.key}") for m in wanted)
    return replace(prior, medications=lines)


def translate(
    doc: SourceDocument,
    mappings: Mappings,
    *,
    prior: Sequence[SourceDocument] = (),
    zone: str = "Europe/Paris",
    recorded: str,
) -> Translation:
    letter = read_letter(doc, mappings, zone)
    issues = list(letter.issues)
    prior_letter: Letter | None = None
    if prior:
        merged = [prior_lines(read_letter(p, mappings, zone)) for p in prior]
        prior_letter = merged[0]
        for extra in merged[1:]:
            prior_letter = type(prior_letter)(
                **{**_fields(prior_letter), "medications": prior_letter.medications + extra.medications}
            )
        issues.extend(_check_same_patient(letter, prior_letter))
        issues.extend(prior_letter.issues)
    admission = (
        list(prior_letter.medications)
        if prior_letter is not None
        else [m for m in letter.medications if m.section is MedSection.ADMISSION] or None
    )
    changes = reconcile(letter.medications, admission)
    from dataclasses import replace

    all_issues = tuple(issues)
    built, build_issues = build(
        letter if all_issues == letter.issues else replace(letter, issues=all_issues),  # (no copy: no prior)
        changes,
        prior_letter,
        mappings,
        raw=doc.raw,
        media_type=doc.media_type,
        recorded=recorded,
    )
    return Translation(letter, built, tuple(build_issues))


def _fields(letter: Letter) -> dict[str, Any]:
    return {f: getattr(letter, f) for f in letter.__dataclass_fields__}


def _check_same_patient(letter: Letter, prior: Letter) -> list[Issue]:
    """Comparing with another patient's list would be dangerous: refuse unless an identifier matches."""
    mine = {(i.system, i.value) for i in letter.patient.ids}
    theirs = {(i.system, i.value) for i in prior.patient.ids}
    if mine & theirs:
        return []
    raise PriorMismatch(
        "the prior medication list shares no patient identifier (INS or IPP) with the letter: "
        "refusing to compare lists that may not be the same patient's",
        where=Where(source=prior.title),
    )
