"""gateway.validate must give the R4B models' verdict: differential tests against check_with_models().

The valid resources are the realistic letter of bench/bench_validate.py, a message Bundle carrying it,
and a few resources using rarer features (contained resources, ``_field`` primitive extensions,
data-absent-reason on a required primitive).  Hypothesis mutates them (drop keys, unknown keys,
list/scalar swaps, empty values, bad dates, wrong JSON types, choice groups, resourceType...) and
checks that ``problems()`` is non-empty exactly when ``check_with_models()`` is, and that the
stricter ``fhir_json=True`` mode never accepts what the models reject.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir_core import types as fhir_core_types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ProfileViolation
from gateway.validate import check, check_with_models, problems

Json = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]


def _load_letter() -> list[Json]:
    spec = importlib.util.spec_from_file_location("bench_validate", ROOT / "bench" / "bench_validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    letter: list[Json] = module.build_letter()
    return letter


LETTER = _load_letter()
XHTML_DIV = '<div xmlns="http://www.w3.org/1999/xhtml"><p>Résumé</p></div>'


def _message_bundle() -> Json:
    header: Json = {
        "resourceType": "MessageHeader",
        "id": "header-1",
        "eventCoding": {"system": "https://fhir.discharge-gateway.fr/CodeSystem/event", "code": "discharge-letter"},
        "destination": [{"name": "Dr Claire Garnier", "endpoint": "mllp://msg.cabinet-des-pentes.fr:2575"}],
        "source": {"name": "discharge-gateway", "software": "discharge-gateway", "endpoint": "https://gw.chu.fr/fhir"},
        "focus": [{"reference": f"urn:uuid:{r['id']}"} for r in LETTER[:3]],
    }
    return {
        "resourceType": "Bundle",
        "id": "bundle-1",
        "meta": {"lastUpdated": "2024-03-14T16:42:07.318+01:00"},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:0b5c1d3e-0000-4000-8000-000000000001"},
        "type": "message",
        "timestamp": "2024-03-14T16:42:07+01:00",
        "entry": [{"fullUrl": "urn:uuid:header-1", "resource": header}]
        + [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in LETTER],
    }


EXTRAS: list[Json] = [
    {
        "resourceType": "Patient",
        "id": "with-contained",
        "contained": [
            {"resourceType": "Organization", "id": "org", "name": "Clinique du Parc"},
            {"resourceType": "Practitioner", "id": "gp", "name": [{"family": "Garnier"}]},
        ],
        "name": [{"family": "Lefèvre", "given": ["Hélène", None], "_given": [None, {"id": "g2"}]}],
        "birthDate": "1955-08",
        "_birthDate": {
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                    "valueDateTime": "1955-08-12T04:10:00+01:00",
                }
            ]
        },
        "deceasedBoolean": False,
        "multipleBirthInteger": 2,
        "managingOrganization": {"reference": "#org"},
        "generalPractitioner": [{"reference": "#gp"}],
        "photo": [{"contentType": "image/png", "data": "iVBORw0KGgo=", "size": 8, "url": "https://x.fr/p.png"}],
    },
    {
        "resourceType": "Observation",
        "id": "absent-status",
        "_status": {
            "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]
        },
        "code": {"text": "Poids"},
        "effectiveDateTime": "2016-12-31T23:59:60Z",
        "issued": "2024-03-14T16:42:07.123456789+01:00",
        "valueQuantity": {"value": 72, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
        "component": [
            {"code": {"text": "IMC"}, "valueQuantity": {"value": 24.9}},
            {"code": {"text": "à jeun"}, "valueBoolean": True},
            {"code": {"text": "heure"}, "valueTime": "07:30:00"},
        ],
        "text": {"status": "generated", "div": XHTML_DIV},
    },
]
VALID: list[Json] = [*LETTER, _message_bundle(), *EXTRAS]


def _label(resource: Json) -> str:
    return f"{resource['resourceType']}/{resource.get('id', '?')}"


def _verdicts(resource: Any) -> tuple[list[str], list[str], list[str]]:
    return problems(resource), check_with_models(resource), problems(resource, fhir_json=True)


def _assert_agree(resource: Any) -> bool:
    """The fast and model verdicts agree; fhir_json rejects whatever R4B rejects. Returns validity."""
    fast, models, strict = _verdicts(resource)
    assert bool(fast) == bool(models), f"fast={fast[:3]} models={models[:3]}"
    if models:
        assert strict, f"fhir_json accepted what R4B rejects: {models[:3]}"
    return not models


# -- valid resources ---------------------------------------------------------------------------------
@pytest.mark.parametrize("resource", VALID, ids=_label)
def test_valid_resources_are_valid_for_both(resource: Json) -> None:
    assert check_with_models(resource) == []
    assert problems(resource) == []
    check(resource)


@pytest.mark.parametrize("resource", [*LETTER, _message_bundle()], ids=_label)
def test_the_letter_is_also_valid_fhir_json(resource: Json) -> None:
    assert problems(resource, fhir_json=True) == []


def test_letter_covers_the_resource_types_of_a_translated_letter() -> None:
    kinds = {r["resourceType"] for r in LETTER}
    assert kinds >= {
        "Patient", "Practitioner", "PractitionerRole", "Organization", "Encounter", "MedicationStatement", "List",
        "CarePlan", "Communication", "Observation", "AllergyIntolerance", "DocumentReference", "Provenance",
        "RelatedPerson",
    }  # fmt: skip
    assert sum(r["resourceType"] == "MedicationStatement" for r in LETTER) >= 10


# -- named cases: (description, mutation, valid for R4B, valid as FHIR JSON) ----------------------------
def _patient(**extra: Any) -> Json:
    return {"resourceType": "Patient", "id": "p1", "name": [{"family": "Lefèvre", "given": ["Hélène"]}], **extra}


def _observation(**extra: Any) -> Json:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "FEVG"}, **extra}


def _header(**extra: Any) -> Json:
    return {"resourceType": "MessageHeader", "source": {"endpoint": "https://gw.chu.fr/fhir"}, **extra}


def _narrative(div: Any) -> Json:
    return _patient(text={"status": "generated", "div": div})


def _ext(**extra: Any) -> Json:
    return _patient(extension=[extra])


CASES: list[tuple[str, Json, bool, bool]] = [
    ("minimal", _patient(), True, True),
    ("unknown key", _patient(nickname="Léna"), False, False),
    ("unknown key in a datatype", _patient(name=[{"family": "X", "nick": "Y"}]), False, False),
    ("_field without element", _patient(_nickname={"id": "x"}), False, False),
    ("missing required primitive", {"resourceType": "Observation", "code": {"text": "x"}}, False, False),
    ("missing required complex", {"resourceType": "Observation", "status": "final"}, False, False),
    ("required complex null", _observation(code=None), True, False),
    ("required primitive null", _observation(status=None), False, False),
    ("required primitive by extension", _observation(status=None, _status={"extension": [{"url": "u"}]}), True, False),
    ("required primitive, extension without extensions", _observation(status=None, _status={"id": "a"}), False, False),
    (
        "missing required array",
        {"resourceType": "AllergyIntolerance", "patient": {"reference": "#p"}, "reaction": [{"description": "x"}]},
        False,
        False,
    ),
    ("scalar where a list goes", _patient(name={"family": "X"}), False, False),
    ("primitive where a list goes", _patient(name=[{"given": "Hélène"}]), False, False),
    ("list where a scalar goes", _patient(gender=["female"]), False, False),
    ("list where an object goes", _patient(maritalStatus=[{"text": "Marié"}]), False, False),
    ("string where an object goes", _patient(maritalStatus="Marié"), False, False),
    ("JSON string where an object goes", _patient(maritalStatus='{"text": "Marié"}'), True, False),
    ("empty string", _patient(name=[{"family": ""}]), False, False),
    ("whitespace-only string", _patient(name=[{"family": "  "}]), True, True),
    ("vertical tab only", _patient(name=[{"family": "\x0b"}]), False, False),
    ("empty code", _patient(gender=""), False, False),
    ("code with double space", _patient(gender="fe  male"), False, False),
    ("empty uri", _patient(identifier=[{"system": "", "value": "1"}]), True, False),
    ("empty list", _patient(telecom=[]), True, False),
    ("empty object", _patient(maritalStatus={}), True, False),
    ("null element", _patient(gender=None), True, False),
    ("null in a complex array", _patient(name=[None]), False, False),
    ("null in a primitive array", _patient(name=[{"given": ["A", None]}]), True, True),
    ("bad date", _patient(birthDate="2020-13-45"), False, False),
    ("no such day", _patient(birthDate="2021-02-29"), False, False),
    ("leap day", _patient(birthDate="2020-02-29"), True, True),
    ("partial date", _patient(birthDate="1955-08"), True, True),
    ("date as timestamp", _patient(birthDate=86400), True, False),
    ("dateTime without timezone", _patient(deceasedDateTime="2020-01-01T10:00:00"), False, False),
    ("dateTime without seconds", _patient(deceasedDateTime="2020-01-01T10:00+01:00"), False, False),
    ("leap second", _patient(deceasedDateTime="2016-12-31T23:59:60Z"), True, True),
    ("instant without time", _observation(issued="2020-01-01"), False, False),
    ("time with zone", _observation(valueTime="10:00:00Z"), False, False),
    ("int where string", _patient(name=[{"family": 5}]), False, False),
    ("string 'yes' where boolean", _patient(active="yes"), True, False),
    ("string 'maybe' where boolean", _patient(active="maybe"), False, False),
    ("1 where boolean", _patient(active=1), True, False),
    ("2 where boolean", _patient(active=2), False, False),
    ("bool where integer", _patient(multipleBirthInteger=True), True, False),
    ("2.0 where integer", _patient(multipleBirthInteger=2.0), True, False),
    ("2.5 where integer", _patient(multipleBirthInteger=2.5), False, False),
    ("'2' where integer", _patient(multipleBirthInteger="2"), True, False),
    ("integer too large", _patient(multipleBirthInteger=2**31), False, False),
    ("negative unsignedInt", _patient(photo=[{"size": -1}]), False, False),
    ("decimal int", _observation(valueQuantity={"value": 5}), True, True),
    ("decimal float", _observation(valueQuantity={"value": 0.1}), True, True),
    ("decimal string", _observation(valueQuantity={"value": "1.5"}), True, False),
    ("decimal bool", _observation(valueQuantity={"value": True}), False, False),
    ("decimal NaN", _observation(valueQuantity={"value": float("nan")}), False, False),
    ("decimal leading zero", _observation(valueQuantity={"value": "01"}), False, False),
    ("base64 with line breaks", _patient(photo=[{"data": "aVZC\nT1J3\n"}]), True, True),
    ("base64 bad padding", _patient(photo=[{"data": "abc"}]), False, False),
    ("bad id", _patient(id="p_1"), False, False),
    ("id too long", _patient(id="a" * 256), False, False),
    ("both choices", _patient(deceasedBoolean=True, deceasedDateTime="2020"), False, False),
    ("required choice present", _header(eventUri="urn:event"), True, True),
    ("required choice missing", _header(), False, False),
    ("required choice null", _header(eventUri=None), False, False),
    ("required choice twice", _header(eventUri="urn:e", eventCoding={"code": "x"}), False, False),
    ("extension without url", _ext(valueString="x"), False, False),
    ("extension with empty url", _ext(url="", valueString="x"), True, False),
    ("extension with two values", _ext(url="u", valueString="x", valueBoolean=True), False, False),
    ("extension without value", _ext(url="u"), True, True),
    ("nested extension", _ext(url="u", extension=[{"url": "a", "valueCode": "b"}]), True, True),
    ("narrative", _narrative(XHTML_DIV), True, True),
    ("narrative plain text", _narrative("Résumé"), True, False),
    ("narrative empty", _narrative(""), True, False),
    ("narrative without namespace", _narrative("<div><p>x</p></div>"), True, False),
    ("narrative without div", _patient(text={"status": "generated"}), False, False),
    ("narrative without status", _patient(text={"div": XHTML_DIV}), False, False),
    ("meta.security coding", _patient(meta={"security": [{"system": "s", "code": "R"}]}), True, True),
    ("meta.security bad code", _patient(meta={"security": [{"system": "s", "code": " R"}]}), False, False),
    ("meta.security as object", _patient(meta={"security": {"code": "R"}}), False, False),
    (
        "Python field name",
        {"resourceType": "Encounter", "status": "finished", "class_fhir": {"code": "IMP"}},
        True,
        False,
    ),
    (
        "Python and JSON names",
        {"resourceType": "Encounter", "status": "finished", "class": {"code": "IMP"}, "class_fhir": {"code": "IMP"}},
        False,
        False,
    ),
    ("fhir_comments", _patient(fhir_comments=["généré"]), True, False),
    ("resourceType on a datatype", _patient(maritalStatus={"resourceType": "CodeableConcept"}), True, False),
    ("wrong resourceType on a datatype", _patient(maritalStatus={"resourceType": "Coding"}), False, False),
    ("unknown resourceType", {"resourceType": "Patiente"}, False, False),
    ("resourceType not a resource", {"resourceType": "HumanName"}, False, False),
    ("no resourceType", {"id": "x"}, False, False),
    ("abstract resourceType", {"resourceType": "DomainResource", "id": "x"}, True, False),
    ("contained", _patient(contained=[{"resourceType": "Organization", "name": "x"}]), True, True),
    ("contained unknown", _patient(contained=[{"resourceType": "Organisation", "name": "x"}]), False, False),
    ("contained invalid", _patient(contained=[{"resourceType": "Organization", "nom": "x"}]), False, False),
    ("contained without resourceType", _patient(contained=[{"id": "x"}]), True, False),
    ("contained non-resource", _patient(contained=[{"resourceType": "Narrative"}]), False, False),
    ("contained resourceType int", _patient(contained=[{"resourceType": 5}]), False, False),
    (
        "bundle entry invalid",
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": {"resourceType": "Patient", "active": "maybe"}}],
        },
        False,
        False,
    ),
    (
        "bundle entry unknown type",
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Letter"}}]},
        False,
        False,
    ),
    (
        "bundle entry null resource",
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": None}]},
        True,
        False,
    ),
    ("not a dict", ["Patient"], False, False),  # type: ignore[list-item]
]


@pytest.mark.parametrize(
    ("resource", "r4b_valid", "fhir_json_valid"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_named_cases(resource: Json, r4b_valid: bool, fhir_json_valid: bool) -> None:
    fast, models, strict = _verdicts(resource)
    assert (not models) is r4b_valid, models
    assert (not fast) is r4b_valid, fast
    assert (not strict) is fhir_json_valid, strict


# -- check(): the first problem, as a ProfileViolation with a FHIRPath ---------------------------------
def test_check_raises_profile_violation_with_path() -> None:
    resource = _patient(name=[{"family": "Lefèvre", "given": ["Hélène", ""]}])
    with pytest.raises(ProfileViolation) as raised:
        check(resource)
    assert raised.value.where.path == "Patient.name[0].given[1]"
    assert raised.value.issue_code == "invariant"
    assert "empty string" in raised.value.message
    outcome = raised.value.to_operation_outcome()
    assert outcome["issue"][0]["expression"] == ["Patient.name[0].given[1]"]


def test_problems_lists_every_problem_with_its_path() -> None:
    resource = _observation(status=None, subject={"reference": "Patient/1", "nope": 1}, issued="2020-01-01")
    found = problems(resource)
    assert any(p.startswith("Observation.status:") for p in found)
    assert any(p.startswith("Observation.subject.nope:") for p in found)
    assert any(p.startswith("Observation.issued:") for p in found)
    with pytest.raises(ProfileViolation, match="more problems"):
        check(resource)


def test_paths_into_bundles_and_choices() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": _patient()}, {"resource": _patient(deceasedBoolean=True, deceasedDateTime="2020")}],
    }
    assert problems(bundle) == ["Bundle.entry[1].resource.deceased[x]: only one of deceased[x] is allowed"]
    assert problems(_header()) == ["MessageHeader.event[x]: event[x] is required"]


def test_inputs_are_not_modified() -> None:
    resource = copy.deepcopy(VALID[-1])
    before = copy.deepcopy(resource)
    problems(resource)
    problems(resource, fhir_json=True)
    check_with_models(resource)
    assert resource == before


# -- primitive types, one by one, against the models ---------------------------------------------------
def _in_extension(key: str) -> Callable[[Any], Json]:
    return lambda value: _patient(extension=[{"url": "https://x.fr/e", key: value}])


HOSTS: dict[str, Callable[[Any], Json]] = {
    "string": lambda v: _patient(name=[{"family": v}]),
    "string[]": lambda v: _patient(name=[{"given": [v]}]),
    "code": lambda v: _patient(gender=v),
    "id": lambda v: _patient(id=v),
    "uri": lambda v: _patient(identifier=[{"system": v}]),
    "url": lambda v: _patient(photo=[{"url": v}]),
    "canonical": lambda v: _patient(meta={"profile": [v]}),
    "markdown": lambda v: _observation(note=[{"text": v}]),
    "oid": _in_extension("valueOid"),
    "uuid": _in_extension("valueUuid"),
    "xhtml": lambda v: _narrative(v),
    "boolean": lambda v: _patient(active=v),
    "integer": lambda v: _patient(multipleBirthInteger=v),
    "positiveInt": _in_extension("valuePositiveInt"),
    "unsignedInt": lambda v: _patient(photo=[{"size": v}]),
    "decimal": lambda v: _observation(valueQuantity={"value": v}),
    "date": lambda v: _patient(birthDate=v),
    "dateTime": lambda v: _patient(deceasedDateTime=v),
    "instant": lambda v: _patient(meta={"lastUpdated": v}),
    "time": lambda v: _observation(valueTime=v),
    "base64Binary": lambda v: _patient(photo=[{"data": v}]),
    "fhir_comments": lambda v: _patient(fhir_comments=v),
    "complex": lambda v: _patient(maritalStatus=v),
    "resource": lambda v: _patient(contained=[v]),
}

WHITESPACE = "".join(
    chr(c) for c in range(0x3100) if chr(c).isspace() or unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp", "Cc", "Cf")
)
# fmt: off
TRICKY: list[Any] = [
    "", " ", "a", "a b", "a  b", " a", "a ", "a\tb", "a\nb", "abc\n", "\ufeff", "\u200b", "\u180e", "\x1c", "\x85",
    "urn:oid:1.2.250.1", "urn:oid:1.02", "urn:oid:3.1", "urn:uuid:c757873d-ec9a-4326-a141-556f43239520",
    "c757873d-ec9a-4326-a141-556f43239520", "1.5", "1e5", "1E-3", "1e999999999999999999999", "-0", "01", "+1", "2",
    " 2", "2.0", "2_0", "true", "false", "yes", "YES", "no", "on", "off", "t", "f", "y", "n", "0", "1",
    "2020", "2020-02", "2020-13", "2020-02-29", "2021-02-29", "2020-04-31", "0000", "0001-01-01",
    "2020-01-01T10:00:00Z", "2020-01-01T10:00:00", "2020-01-01T24:00:00Z", "2020-01-01T10:00:00.123456789+14:00",
    "2020-01-01T10:00:00+14:01", "2016-12-31T23:59:60Z", "2021-02-29T23:59:60Z", "10:00:00", "23:59:60", "24:00:00",
    "aGVsbG8=", "aGVsbG8", "aGVs bG8=", "====", "a===", "é", "Hélène", "a\ud800", "\udfff",
    '<div xmlns="http://www.w3.org/1999/xhtml">x</div>', "<div>x</div>", '{"text": "x"}', '{"id": "x"}', "[]",
    0, 1, -1, 2, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 86400, 10**20, 10**5000, 0.0, 1.0, 1.5, -0.0, 1e300,
    float("inf"), float("nan"), True, False, None, [], [None], ["a"], ["a", 1], {}, {"text": "x"}, {"id": "x"},
    {"resourceType": "Organization"}, {"resourceType": "Coding"}, ("a",), [{"text": "x"}],
]
# fmt: on


def _fresh(values: list[Any]) -> st.SearchStrategy[Any]:
    """Copies of the values: mutations must never reach the shared examples."""
    return st.sampled_from(values).map(copy.deepcopy)


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), _fresh(TRICKY[:60]))
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["text", "id", "code", "value", "extension", "url", "x"]), inner, max_size=3),
    ),
    max_leaves=6,
)
PRIMITIVE_VALUES = st.one_of(
    _fresh(TRICKY),
    st.text(max_size=10),
    st.text(st.sampled_from(WHITESPACE + "ab-.:+=/T0Z9é"), max_size=6),
    st.from_regex(fhir_core_types.DateTime.pattern, fullmatch=True),
    st.from_regex(fhir_core_types.Instant.pattern, fullmatch=True),
    st.from_regex(fhir_core_types.Time.pattern, fullmatch=True),
    st.from_regex(fhir_core_types.Decimal.pattern, fullmatch=True),
    st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode()),
    st.integers(),
    st.floats(),
    JSON_VALUES,
)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(HOSTS)), value=PRIMITIVE_VALUES)
def test_every_primitive_kind_agrees_with_the_models(kind: str, value: Any) -> None:
    _assert_agree(HOSTS[kind](value))


@pytest.mark.parametrize("kind", ["string", "code", "id", "uri", "markdown"])
def test_unicode_whitespace_agrees_with_the_models(kind: str) -> None:
    # pydantic applies patterns with the Rust regex engine, whose \s is not Python's
    for char in WHITESPACE:
        for value in (char, char * 2, f"a{char}", f"a{char}b", f"a{char}{char}b", f"{char}a"):
            _assert_agree(HOSTS[kind](value))


def _value_id(value: Any) -> str:
    return "10**5000" if isinstance(value, int) and value.bit_length() > 1000 else repr(value)[:40]


@pytest.mark.parametrize("value", TRICKY, ids=_value_id)
@pytest.mark.parametrize("kind", sorted(HOSTS))
def test_tricky_values_agree_with_the_models(kind: str, value: Any) -> None:
    _assert_agree(HOSTS[kind](value))


# -- mutations of the valid resources --------------------------------------------------------------------
Slot = tuple[Any, Any]  # (container, key or index)


def _slots(value: Any) -> Iterator[Slot]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield value, key
            yield from _slots(item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield value, index
            yield from _slots(item)


def _objects(value: Any) -> Iterator[Json]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _objects(item)
    elif isinstance(value, list):
        for item in value:
            yield from _objects(item)


UNKNOWN_KEYS = ["foo", "_foo", "Family", "valueString", "value", "resource_type", "resourceType", "class_fhir",
                "active__ext", "fhir_comments", "extension", "_id", "id", "url", "text", "status"]  # fmt: skip
CHOICE_PREFIXES = ("value", "medication", "effective", "event", "content", "deceased", "multipleBirth", "onset",
                   "occurrence", "scheduled", "dose", "timing", "item", "reported", "performed", "asNeeded")  # fmt: skip
CHOICE_SUFFIXES = ["String", "Boolean", "CodeableConcept", "Reference", "DateTime", "Period", "Quantity", "Uri",
                   "Coding", "Attachment", "Integer", "Code"]  # fmt: skip
RESOURCE_TYPES = ["Foo", "Patient", "Observation", "Resource", "DomainResource", "Element", "Narrative", "patient",
                  "", "Extension", "HumanName", "Bundle", 5, None]  # fmt: skip
DATES = ["2020-13-45", "2020-01-01T10:00:00", "2020-02-30", "2020", "2020-02-29T12:00:00+01:00", "2020-01-01",
         "2016-12-31T23:59:60Z", "10:00:00", "2020-01-01T10:00:00.5Z", "2020-1-1", "2020-01-01 10:00:00Z"]  # fmt: skip


def _mutate(data: st.DataObject, resource: Json) -> str:
    """Apply one random mutation in place; return what it did (for the failure report)."""
    mutation = data.draw(
        st.sampled_from(
            ["drop", "unknown", "wrap", "unwrap", "empty-string", "empty-list", "empty-object", "null", "date",
             "int", "bool-string", "number", "bool", "choice", "resource-type", "json"]
        ),
        label="mutation",
    )  # fmt: skip
    if mutation in ("unknown", "choice", "resource-type"):
        obj = data.draw(st.sampled_from(list(_objects(resource))), label="object")
        if mutation == "unknown":
            key = data.draw(st.sampled_from(UNKNOWN_KEYS) | st.text(max_size=6), label="key")
            obj[key] = data.draw(JSON_VALUES, label="value")
            return f"unknown {key!r}"
        if mutation == "choice":
            present = [k for k in obj if isinstance(k, str) and k.startswith(CHOICE_PREFIXES)]
            prefix = next((p for p in CHOICE_PREFIXES if present and present[0].startswith(p)), "value")
            key = prefix + data.draw(st.sampled_from(CHOICE_SUFFIXES), label="suffix")
            obj[key] = data.draw(_fresh(["x", True, {"text": "x"}, {"reference": "#a"}, "2020", 3]), label="value")
            return f"choice {key!r}"
        obj["resourceType"] = data.draw(st.sampled_from(RESOURCE_TYPES), label="resourceType")
        return "resourceType"
    slots = list(_slots(resource))
    container, key = data.draw(st.sampled_from(slots), label="slot")
    value = container[key]
    if mutation == "drop":
        del container[key]
    elif mutation == "wrap":
        container[key] = [value]
    elif mutation == "unwrap":
        container[key] = value[0] if isinstance(value, list) and value else {"x": value} if value else value
    elif mutation == "empty-string":
        container[key] = ""
    elif mutation == "empty-list":
        container[key] = []
    elif mutation == "empty-object":
        container[key] = {}
    elif mutation == "null":
        container[key] = None
    elif mutation == "date":
        container[key] = data.draw(st.sampled_from(DATES), label="date")
    elif mutation == "int":
        container[key] = data.draw(st.integers(), label="int")
    elif mutation == "bool-string":
        container[key] = data.draw(st.sampled_from(["true", "yes", "1", "maybe", "T", ""]) | st.text(max_size=4))
    elif mutation == "number":
        container[key] = data.draw(st.floats() | st.sampled_from([2.0, 0.5, 1e300, -1.0]), label="number")
    elif mutation == "bool":
        container[key] = data.draw(st.booleans(), label="bool")
    else:
        container[key] = data.draw(JSON_VALUES, label="json")
    return f"{mutation} at {key!r}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutations_agree_with_the_models(data: st.DataObject) -> None:
    seeds = [r for r in VALID if r["resourceType"] != "Bundle"]
    resource = copy.deepcopy(data.draw(st.sampled_from(seeds), label="seed"))
    done = [_mutate(data, resource) for _ in range(data.draw(st.integers(1, 3), label="mutations"))]
    fast, models, strict = _verdicts(resource)
    assert bool(fast) == bool(models), f"{done}: fast={fast[:3]} models={models[:3]}"
    if models:
        assert strict, f"{done}: fhir_json accepted what R4B rejects: {models[:3]}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutations_inside_a_message_bundle_agree_with_the_models(data: st.DataObject) -> None:
    bundle = _message_bundle()
    entries = bundle["entry"]
    index = data.draw(st.integers(0, len(entries) - 1), label="entry")
    entries[index] = copy.deepcopy(entries[index])
    done = _mutate(data, entries[index])
    fast, models, _ = _verdicts(bundle)
    assert bool(fast) == bool(models), f"{done}: fast={fast[:3]} models={models[:3]}"
