"""The fast paths of prepare() and the cut say exactly what their general versions say.

- ``MedicalScanner.hit_folded`` (the mapping set's lexicon as one regex search) with ``hit`` (by words);
- ``Compiled.mask_folded`` (each context lexicon asked once while the text is unchanged, by regex)
  with ``mask_borderline``;

on arbitrary borderline rules and term lists (hypothesis) and on the text of every fixture letter, with
the scanner of a real letter (its drug names); the redaction's ``blocked`` (nothing to sort when the
recipient may see every label) with the sorted search it short-cuts; and the model's value types, made
by ``_slot_init``'s ``__init__``, with the same fields made by the dataclass's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import model, redact
from gateway.consent import Decision
from gateway.label import LabelRules, rules_from
from gateway.pipeline import prepare
from gateway.settings import Settings
from gateway.text import fold
from tests.conftest import FIXED_NOW, FIXTURES, mappings

_word = st.text(st.sampled_from("abcdeiz019"), min_size=1, max_size=4)
_term = st.one_of(
    _word,
    st.builds(lambda w: w + "*", _word),
    st.builds(lambda a, b: f"{a} {b}", _word, _word),
    st.builds(lambda a, b: f"{a} {b}*", _word, _word),
)
_texts = st.lists(st.one_of(_word, st.sampled_from(["s", "x", "a", "b"])), max_size=12).map(" ".join)


def _fixture_texts() -> list[str]:
    texts = []
    for path in sorted(FIXTURES.rglob("*")):
        if path.suffix in (".xml", ".ccda", ".json"):
            text = path.read_text(encoding="utf-8", errors="replace")
            texts += [fold(text[i : i + 300]) for i in range(0, len(text), 150)]
    return texts


def _rules_with(borderline: list[dict[str, Any]], lexicons: dict[str, list[str]]) -> LabelRules:
    data = rules_from(mappings()).model_dump()
    data["borderline"] = borderline
    data["lexicons"] = {**data["lexicons"], **lexicons}
    return LabelRules.model_validate(data)


# few words, so that the rules' terms and their contexts' overlap: a removal can silence a context
_few = st.sampled_from(["a", "b", "c", "ab", "a b", "b*"])


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.lists(_few, max_size=3), st.sampled_from([None, "x", "y"])), max_size=5),
    st.lists(_few, max_size=3),
    st.lists(_few, max_size=3),
    st.lists(st.lists(st.sampled_from(["a", "b", "c", "ab", "d"]), max_size=6).map(" ".join), min_size=1, max_size=4),
)
@example([(["a"], "x"), (["b"], "x")], ["a"], [], ["a b"])  # the first removal silences the shared context
def test_masking_folded_text_is_mask_borderline(
    rules: list[tuple[list[str], str | None]], x: list[str], y: list[str], texts: list[str]
) -> None:
    borderline = [{"name": f"b{i}", "terms": terms, "logistics_in": ctx} for i, (terms, ctx) in enumerate(rules)]
    compiled = _rules_with(borderline, {"x": x, "y": y}).compiled
    for text in texts:
        assert compiled.mask_folded(text) == compiled.mask_borderline(text)


def test_masking_fixture_text_is_mask_borderline() -> None:
    compiled = rules_from(mappings()).compiled
    assert compiled.masking, "the mapping set masks borderline terms in some context"
    for text in _fixture_texts():
        assert compiled.mask_folded(text) == compiled.mask_borderline(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(_term, max_size=8), st.lists(_texts, min_size=1, max_size=4))
def test_scanning_folded_text_is_hit(terms: list[str], texts: list[str]) -> None:
    scanner = redact.MedicalScanner(terms, {"code": r"\b[a-c][0-9]{2}\b", "dose": r"\b[0-9]+ ?mg\b"})
    for text in texts:
        assert scanner.hit_folded(text) == scanner.hit(text)


def test_scanning_fixture_text_is_hit() -> None:
    raw = (FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml").read_bytes()
    letter = prepare(raw, name="s6.xml", mappings=mappings(), settings=Settings(), now=FIXED_NOW)
    assert letter.scanner._drugs._words, "the letter names drugs"
    verdicts = set()
    for text in _fixture_texts():
        verdicts.add(letter.scanner.hit(text))
        assert letter.scanner.hit_folded(text) == letter.scanner.hit(text)
    assert {"lexicon", "letter-drug", None} <= verdicts  # the texts exercise each answer


def _blocked_plain(decision: Decision, categories: set[str], sensitivity: set[str]) -> str | None:
    """The first category, then sensitivity code, not allowed, in sorted order (as first written)."""
    for category in sorted(categories):
        if category not in decision.categories:
            return category
    for code in sorted(sensitivity):
        if code not in decision.sensitive:
            return code
    return None


_labels = st.sets(st.sampled_from(["medical", "social", "logistics", "PSY", "ETH", "HIV", "SDV"]), max_size=4)


@settings(max_examples=300, deadline=None)
@given(_labels, _labels, _labels, _labels)
def test_blocked_is_the_sorted_search(allowed: set[str], sensitive: set[str], cats: set[str], codes: set[str]) -> None:
    decision = Decision("r", None, False, frozenset(allowed), frozenset(sensitive), {})
    unused: Any = None  # blocked reads the decision only
    cutter = redact._Cutter(decision, unused, unused, unused, unused)
    for categories, sensitivity in ((cats, codes), (frozenset(cats), frozenset(codes)), (list(cats), codes)):
        assert cutter.blocked(categories, sensitivity) == _blocked_plain(decision, cats, codes)


_MODEL_CLASSES = [c for c in vars(model).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]


def _plain_twin(cls: type) -> Any:
    """The same fields made into a frozen slotted dataclass with the dataclass's own __init__."""
    specs = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            specs.append((f.name, f.type, dataclasses.field(default=f.default)))
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, f.type, dataclasses.field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, f.type))
    return dataclasses.make_dataclass(cls.__name__, specs, frozen=True, slots=True)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_MODEL_CLASSES), st.data())
def test_model_values_are_made_as_the_dataclass_init_makes_them(cls: type, data: st.DataObject) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    values = data.draw(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3)), min_size=len(names)))
    positional = data.draw(st.integers(0, len(values)))  # (more than the fields: too many arguments)
    keywords = data.draw(st.sets(st.sampled_from([*names[positional:], "unknown"]) if names else st.nothing()))
    args = values[:positional]
    kwargs = {n: values[names.index(n)] if n in names else 0 for n in keywords}

    def made(kind: Any) -> tuple[str, Any]:
        try:
            value = kind(*args, **kwargs)
        except TypeError as exc:  # a missing, unknown or repeated argument: the same refusal
            return "refused", str(exc)
        return "made", [getattr(value, n) for n in names]

    assert made(cls) == made(_plain_twin(cls))


def test_model_values_stay_frozen_with_fresh_defaults() -> None:
    for cls in (model.Organization, model.MedicationLine, model.Stay):
        required = [f for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING]
        first, second = cls(*["x"] * len(required)), cls(*["x"] * len(required))
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:  # made for each instance, as dataclasses do
                assert getattr(first, f.name) == f.default_factory()
                assert getattr(first, f.name) is not getattr(second, f.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(first, dataclasses.fields(cls)[0].name, 1)


def test_every_model_value_type_has_the_slot_init() -> None:
    assert len(_MODEL_CLASSES) >= 20
    for cls in _MODEL_CLASSES:
        assert any(name.startswith("_set_") for name in cls.__init__.__code__.co_names), cls
