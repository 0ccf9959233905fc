"""Stage 3 — label: give every resource and every mixed element its data category and sensitivity.

Categories (``medical``, ``social``, ``logistics``) are a project code system carried in
``meta.security`` beside the letter's HL7 confidentiality code and HL7 sensitivity codes (PSY, ETH,
HIV...).  The rules are data (``mappings/labels.yaml``); the labeller fails closed: a resource type
or an element that no rule classifies is ``medical``, so a forgotten rule can only withhold data,
never leak it.  Elements of mixed resources — ``CarePlan.activity`` and ``Communication.payload`` —
carry inline labels (DS4P ``extension-inline-sec-label``: one for the category, one per sensitivity
code) so later stages can cut a recipient's view element by element.

Sensitivity comes from codes (ATC of a drug, CIM-10 of a diagnosis) *and* from text (a lexicon per
code), because letters describe an alcohol use disorder in a free-text synthesis as often as they code
it.  The original letter and the translation report carry every code found anywhere in the letter.
Borderline items (incontinence, diet, cognitive decline, addiction, psychological state) follow the
explicit ``borderline`` rules of the same file.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr

from gateway.mappings import Mappings, load_model
from gateway.text import Lexicon, fold, strings_in

__all__ = [
    "CONFIDENTIALITY",
    "INLINE_LABEL",
    "LabelRules",
    "apply",
    "categories_of",
    "inline_category",
    "inline_sensitivity",
    "rules_from",
]

INLINE_LABEL = "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-inline-sec-label"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
Category = Literal["medical", "social", "logistics"]
Json = dict[str, Any]
_TEXT_SKIP = frozenset({"system", "reference", "url", "div", "id", "data", "fullUrl"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActivityRule(_Strict):
    category: Category
    when_any: str


class Borderline(_Strict):
    name: str
    terms: tuple[str, ...]
    logistics_in: str | None


class SensitivityRule(_Strict):
    code: str
    display: str
    atc: tuple[str, ...] = ()
    icd10: tuple[str, ...] = ()
    terms: tuple[str, ...] = ()


class Sensitivity(_Strict):
    system: str
    text_in: tuple[str, ...] = ()
    rules: tuple[SensitivityRule, ...]


class Compiled:
    """The label rules' lexicons, compiled once; a plain object so hot loops avoid pydantic's attribute hooks."""

    __slots__ = ("any_sensitive", "borderline", "coded", "displays", "lexicons", "sensitive")

    def __init__(self, rules: LabelRules) -> None:
        self.lexicons = {name: Lexicon(terms) for name, terms in rules.lexicons.items()}
        self.sensitive = {r.code: Lexicon(r.terms) for r in rules.sensitivity.rules}
        # every sensitivity term in one lexicon: it hits whenever one of the codes' lexicons does, so
        # the (usual) text that names nothing sensitive is ruled out with one look instead of one per code
        self.any_sensitive = Lexicon(t for r in rules.sensitivity.rules for t in r.terms)
        self.coded = [(r.code, r.atc, r.icd10) for r in rules.sensitivity.rules]
        self.displays: dict[str, str] = {}
        for r in rules.sensitivity.rules:
            self.displays.setdefault(r.code, r.display)
        self.borderline = [(Lexicon(b.terms), b.logistics_in) for b in rules.borderline]

    def hits(self, lexicon: str, folded_text: str) -> bool:
        return self.lexicons[lexicon].hit(folded_text)

    def mask_borderline(self, folded_text: str) -> str:
        for lexicon, context in self.borderline:
            if context is not None and self.lexicons[context].hit(folded_text):
                folded_text = lexicon.remove(folded_text)
        return folded_text

    def sensitive_in_text(self, folded_text: str) -> list[str]:
        tokens = folded_text.split()
        if not self.any_sensitive.hit(folded_text, tokens):
            return []
        return [code for code, lexicon in self.sensitive.items() if lexicon.hit(folded_text, tokens)]


class LabelRules(_Strict):
    system: str
    fallback: Literal["medical"]
    resources: dict[str, Category | Literal["by-element"]]
    payload: dict[str, Category]
    activities: tuple[ActivityRule, ...]
    lexicons: dict[str, tuple[str, ...]]
    borderline: tuple[Borderline, ...] = ()
    sensitivity: Sensitivity
    _compiled: Compiled | None = PrivateAttr(default=None)

    def model_post_init(self, _context: Any) -> None:
        for rule in self.activities:
            if rule.when_any not in self.lexicons:
                raise ValueError(f"activity rule names unknown lexicon {rule.when_any!r}")
        for item in self.borderline:
            if item.logistics_in is not None and item.logistics_in not in self.lexicons:
                raise ValueError(f"borderline rule {item.name!r} names unknown lexicon {item.logistics_in!r}")
        self._compiled = Compiled(self)

    @property
    def compiled(self) -> Compiled:
        assert self._compiled is not None
        return self._compiled

    def hits(self, lexicon: str, folded_text: str) -> bool:
        """Whether the (folded) text contains a term of the lexicon."""
        return self.compiled.hits(lexicon, folded_text)

    def mask_borderline(self, folded_text: str) -> str:
        """The text with the borderline terms that its context makes non-medical blanked out."""
        return self.compiled.mask_borderline(folded_text)

    def sensitive_in_text(self, folded_text: str) -> list[str]:
        return self.compiled.sensitive_in_text(folded_text)

    def display(self, code: str) -> str:
        return self.compiled.displays.get(code, code)


def rules_from(mappings: Mappings) -> LabelRules:
    """The label rules of a mapping set, validated (MappingLoadError when broken)."""
    return load_model(mappings, "labels.yaml", LabelRules)


def _coding(system: str, code: str, display: str | None = None) -> Json:
    out: Json = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _codes(value: Any, systems: Sequence[str]) -> Iterable[str]:
    if isinstance(value, Mapping):
        for coding in value.get("coding", []):
            if coding.get("system") in systems and coding.get("code"):
                yield str(coding["code"]).upper().replace(".", "")


def _strings(node: Any) -> list[str]:
    return strings_in(node, _TEXT_SKIP)


def _text(node: Any) -> str:
    return fold(" ".join(_strings(node)))


_ICD = ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm")


def _coded_sensitivity(resource: Mapping[str, Any], compiled: Compiled) -> set[str]:
    atc = list(_codes(resource.get("medicationCodeableConcept"), ("http://www.whocc.no/atc",)))
    icd: list[str] = []
    for key in ("code", "valueCodeableConcept"):
        icd.extend(_codes(resource.get(key), _ICD))
    for reason in resource.get("reasonCode", []):
        icd.extend(_codes(reason, _ICD))
    found = set()
    if atc or icd:  # most resources carry neither
        for code, atc_prefixes, icd_prefixes in compiled.coded:
            if any(c.startswith(atc_prefixes) for c in atc) or any(c.startswith(icd_prefixes) for c in icd):
                found.add(code)
    return found


def activity_category(activity: Mapping[str, Any], rules: LabelRules) -> Category:
    detail = activity.get("detail") or {}
    code = detail.get("code") or {}
    parts = [str(detail.get("description") or ""), str(code.get("text") or "")]
    parts.extend(str(c.get("display") or "") for c in code.get("coding", []))
    compiled = rules.compiled
    text = compiled.mask_borderline(fold(" ".join(parts)))
    for rule in rules.activities:
        if compiled.hits(rule.when_any, text):
            return rule.category
    return rules.fallback


def payload_category(payload: Mapping[str, Any], rules: LabelRules) -> Category:
    element_id = str(payload.get("id") or "")
    for pattern, category in rules.payload.items():
        if fnmatch.fnmatchcase(element_id, pattern):
            return category
    return rules.fallback


def _inline(element: Json, system: str, category: str, sensitivity: Iterable[str], rules: LabelRules) -> None:
    extensions = [e for e in element.get("extension", []) if e.get("url") != INLINE_LABEL]
    extensions.append({"url": INLINE_LABEL, "valueCoding": _coding(system, category)})
    for code in sorted(sensitivity):
        extensions.append(
            {"url": INLINE_LABEL, "valueCoding": _coding(rules.sensitivity.system, code, rules.display(code))}
        )
    element["extension"] = extensions


def inline_category(element: Mapping[str, Any], system: str) -> str | None:
    """The inline data-category label of an element, or None."""
    for ext in element.get("extension", []):
        coding = ext.get("valueCoding") or {}
        if ext.get("url") == INLINE_LABEL and coding.get("system") == system:
            return str(coding.get("code"))
    return None


def inline_sensitivity(element: Mapping[str, Any], system: str) -> set[str]:
    """The inline HL7 sensitivity codes of an element."""
    return {
        str(ext["valueCoding"]["code"])
        for ext in element.get("extension", [])
        if ext.get("url") == INLINE_LABEL and (ext.get("valueCoding") or {}).get("system") == system
    }


def categories_of(resource: Mapping[str, Any], system: str) -> set[str]:
    return {str(c["code"]) for c in resource.get("meta", {}).get("security", []) if c.get("system") == system}


# payloads whose content is the letter's drugs or plan rather than their own text
_DRUG_PAYLOADS = ("change-table", "list", "original")
_PLAN_PAYLOADS = ("follow-up-plan", "careplan")


def apply(resources: Sequence[Json], rules: LabelRules, confidentiality: str | None = None) -> None:
    """Label every resource in place (the dicts are fresh from the builder and owned by this stage)."""
    compiled = rules.compiled  # once: a pydantic private attribute is slow to reach
    own: dict[str, set[str]] = {}
    inline: dict[int, tuple[str, set[str]]] = {}
    for res in resources:
        found = _coded_sensitivity(res, compiled)
        kind = rules.resources.get(res["resourceType"], rules.fallback)
        if kind == "by-element":
            if res["resourceType"] == "CarePlan":
                for activity in res.get("activity") or []:
                    codes = set(compiled.sensitive_in_text(_text(activity.get("detail", {}))))
                    inline[id(activity)] = (activity_category(activity, rules), codes)
                    found |= codes
        elif res["resourceType"] in rules.sensitivity.text_in:
            found |= set(compiled.sensitive_in_text(_text({k: v for k, v in res.items() if k != "text"})))
        own[res["id"]] = found
    drugs = set().union(*(own[r["id"]] for r in resources if r["resourceType"] == "MedicationStatement"))
    plan = set().union(*(own[r["id"]] for r in resources if r["resourceType"] == "CarePlan"))
    letter = set().union(*own.values())
    for res in resources:
        kind = rules.resources.get(res["resourceType"], rules.fallback)
        categories: list[str] = []
        sensitivity = set(own[res["id"]])
        if res["resourceType"] == "List":
            sensitivity |= drugs
        elif res["resourceType"] in ("DocumentReference", "OperationOutcome"):
            sensitivity |= letter  # the original letter and the report contain everything
        if kind == "by-element":
            if res["resourceType"] == "CarePlan":
                for activity in res.get("activity") or []:
                    category, codes = inline[id(activity)]
                    _inline(activity, rules.system, category, codes, rules)
                    categories.append(category)
            else:
                for payload in res.get("payload") or []:
                    category = payload_category(payload, rules)
                    element_id = str(payload.get("id") or "")
                    if element_id in _DRUG_PAYLOADS:
                        codes = drugs if element_id != "original" else letter
                    elif element_id in _PLAN_PAYLOADS:
                        codes = plan
                    else:
                        codes = set(compiled.sensitive_in_text(_text(payload)))
                    _inline(payload, rules.system, category, codes, rules)
                    categories.append(category)
                    sensitivity |= codes
            if not categories:
                categories.append(rules.fallback)
        else:
            categories.append(kind)
        security = [_coding(rules.system, c) for c in dict.fromkeys(categories)]
        if confidentiality:
            security.append(_coding(CONFIDENTIALITY, confidentiality))
        security.extend(_coding(rules.sensitivity.system, c, rules.display(c)) for c in sorted(sensitivity))
        res["meta"] = {**res.get("meta", {}), "security": security}
        # keep "meta" right after "id" for readable output
        ordered: dict[str, Any] = {k: res[k] for k in ("resourceType", "id", "meta") if k in res}
        ordered.update({k: v for k, v in res.items() if k not in ordered})
        res.clear()
        res.update(ordered)
