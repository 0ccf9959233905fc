"""The change table: statuses, where they came from, and never a guess."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import Code, Concept, Dose, MedicationLine, MedSection, Timing
from gateway.translate.reconcile import ATC, CIP, CIS, Basis, Status, reconcile


def line(
    section: MedSection,
    key: str,
    name: str,
    *,
    cis: str | None = None,
    cip: str | None = None,
    atc: str | None = None,
    dose: str | None = "1",
    per_day: int | None = 1,
    comment: str | None = None,
) -> MedicationLine:
    codings = []
    if cis:
        codings.append(Code(CIS, cis))
    if cip:
        codings.append(Code(CIP, cip))
    if atc:
        codings.append(Code(ATC, atc))
    return MedicationLine(
        section=section,
        key=key,
        product=Concept(tuple(codings), name),
        name=name,
        dose=Dose(Decimal(dose), "{tbl}") if dose else None,
        timing=None
        if per_day is None
        else Timing(
            period=Decimal(24) / per_day if per_day != 1 else Decimal(1),
            period_unit="h" if per_day != 1 else "d",
            frequency=1,
        ),
        comment=comment,
    )


D, S, A = MedSection.DISCHARGE, MedSection.STOPPED, MedSection.ADMISSION


def test_same_cis_same_posology_is_continued() -> None:
    rows = reconcile([line(D, "d1", "BISOPROLOL 5 mg", cis="1")], [line(A, "a1", "BISOPROLOL 5 mg", cis="1")])
    assert [(r.status, r.basis, r.matched_by) for r in rows] == [(Status.CONTINUED, Basis.DERIVED, "cis")]


def test_same_cis_other_frequency_is_modified_and_keeps_its_reason() -> None:
    rows = reconcile(
        [line(D, "d1", "FUROSEMIDE 40 mg", cis="1", per_day=2, comment="rétention hydrosodée")],
        [line(A, "a1", "FUROSEMIDE 40 mg", cis="1")],
    )
    assert rows[0].status is Status.MODIFIED
    assert rows[0].reason == "rétention hydrosodée"
    assert rows[0].before is not None and rows[0].before.key == "a1"


def test_cip_is_used_when_cis_is_absent() -> None:
    rows = reconcile([line(D, "d1", "X", cip="3400930000001")], [line(A, "a1", "Y", cip="3400930000001")])
    assert rows[0].matched_by == "cip"


def test_same_atc_other_brand_is_equivalence() -> None:
    rows = reconcile(
        [line(D, "d1", "ATORVASTATINE BIOGARAN 20 mg", cis="2", atc="C10AA05")],
        [line(A, "a1", "TAHOR 20 mg", cis="1", atc="C10AA05")],
    )
    assert (rows[0].status, rows[0].matched_by) == (Status.EQUIVALENCE, "atc")


def test_same_atc_same_brand_other_strength_is_modified() -> None:
    rows = reconcile(
        [line(D, "d1", "KARDEGIC 75 mg", cis="2", atc="B01AC06")],
        [line(A, "a1", "KARDEGIC 160 mg", cis="1", atc="B01AC06")],
    )
    assert rows[0].status is Status.MODIFIED


def test_name_is_the_last_resort_and_says_so() -> None:
    rows = reconcile([line(D, "d1", "Lévothyrox 50 µg")], [line(A, "a1", "LEVOTHYROX 50 µg")])
    assert rows[0].matched_by == "name"
    assert any("name" in note for note in rows[0].notes)


def test_new_line_with_admission_list_is_initiated() -> None:
    rows = reconcile([line(D, "d1", "FORXIGA 10 mg", cis="9")], [line(A, "a1", "BISOPROLOL", cis="1")])
    statuses = {r.line.key: (r.status, r.basis) for r in rows}
    assert statuses["d1"] == (Status.INITIATED, Basis.DERIVED)
    assert statuses["a1"] == (Status.STOPPED, Basis.DERIVED)  # on admission, not at discharge


def test_without_admission_list_novelty_is_unknown() -> None:
    rows = reconcile([line(D, "d1", "FORXIGA 10 mg", cis="9"), line(S, "s1", "IBUPROFENE", cis="5")], None)
    statuses = {r.line.key: (r.status, r.basis) for r in rows}
    assert statuses["d1"] == (Status.UNKNOWN, Basis.UNKNOWN)
    assert statuses["s1"] == (Status.STOPPED, Basis.STATED)


def test_stopped_old_dose_and_new_dose_make_one_modified_row() -> None:
    rows = reconcile(
        [
            line(S, "s1", "KARDEGIC 160 mg", cis="1", atc="B01AC06", comment="saignement"),
            line(D, "d1", "KARDEGIC 75 mg", cis="2", atc="B01AC06"),
        ],
        None,
    )
    assert len(rows) == 1
    assert (rows[0].status, rows[0].basis) == (Status.MODIFIED, Basis.DERIVED)
    assert rows[0].reason == "saignement" and rows[0].related[0].key == "s1"


def test_stopped_line_matching_admission_is_stated() -> None:
    rows = reconcile(
        [line(S, "s1", "IBUPROFENE 400", cis="5", comment="insuffisance rénale")],
        [line(A, "a1", "IBUPROFENE 400", cis="5")],
    )
    assert [(r.status, r.basis, r.reason) for r in rows] == [(Status.STOPPED, Basis.STATED, "insuffisance rénale")]


def test_missing_posology_is_not_silently_continued() -> None:
    rows = reconcile(
        [line(D, "d1", "X", cis="1", dose=None, per_day=None)], [line(A, "a1", "X", cis="1", dose=None, per_day=None)]
    )
    assert rows[0].status is Status.CONTINUED
    assert any("cannot be excluded" in n for n in rows[0].notes)


def test_two_identical_admission_lines_match_one_each() -> None:
    rows = reconcile(
        [line(D, "d1", "PARACETAMOL 1 g", cis="1"), line(D, "d2", "PARACETAMOL 1 g", cis="1")],
        [line(A, "a1", "PARACETAMOL 1 g", cis="1"), line(A, "a2", "PARACETAMOL 1 g", cis="1")],
    )
    befores = {r.before.key for r in rows if r.before is not None}
    assert befores == {"a1", "a2"}


_codes = st.sampled_from(["1", "2", "3", "4"])


@st.composite
def _lines(draw: st.DrawFn, section: MedSection, prefix: str) -> list[MedicationLine]:
    count = draw(st.integers(0, 5))
    return [
        line(
            section,
            f"{prefix}{i}",
            draw(st.sampled_from(["A 10 mg", "B 5 mg", "C", "A 20 mg"])),
            cis=draw(st.none() | _codes),
            atc=draw(st.none() | st.sampled_from(["N02BE01", "C10AA05"])),
            per_day=draw(st.integers(1, 3)),
        )
        for i in range(count)
    ]


@settings(max_examples=200, deadline=None)
@given(_lines(D, "d"), _lines(S, "s"), st.none() | _lines(A, "a"))
def test_every_line_is_accounted_for_exactly_once(
    discharge: list[MedicationLine], stopped: list[MedicationLine], admission: list[MedicationLine] | None
) -> None:
    rows = reconcile([*discharge, *stopped], admission)
    subjects = [r.line.key for r in rows]
    assert len(subjects) == len(set(subjects))
    folded = [x.key for r in rows for x in r.related]
    for d in discharge:
        assert subjects.count(d.key) == 1
    for s in stopped:
        assert (s.key in subjects) != (s.key in folded)
    used_before = [r.before.key for r in rows if r.before is not None and r.before.section is A]
    assert len(used_before) == len(set(used_before)), "an admission line was matched twice"
    if admission is None:
        for r in rows:
            assert r.status not in (Status.INITIATED, Status.CONTINUED, Status.EQUIVALENCE) or r.related
    for r in rows:
        assert r.basis is not Basis.UNKNOWN or r.status is Status.UNKNOWN
