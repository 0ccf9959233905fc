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
from gateway.text import Lexicon, fold, fold_joined, strings_in

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

    __slots__ = ("any_sensitive", "borderline", "coded", "displays", "lexicons", "masking", "payload", "sensitive")

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
        # the rules with a context, each with its context's lexicon (for mask_folded)
        self.masking = [
            (lexicon, self.lexicons[context]) for lexicon, context in self.borderline if context is not None
        ]
        # payload patterns in order, each with whether it is a plain id (fnmatch of a pattern without
        # * ? [ is equality: no fnmatch call for those)
        self.payload = [(p, c, not any(ch in p for ch in "*?[")) for p, c in rules.payload.items()]

    def hits(self, lexicon: str, folded_text: str) -> bool:
        return self.lexicons[lexicon].hit(folded_text)

    def mask_borderline(self, folded_text: str) -> str:
        for lexicon, context in self.borderline:
            if context is not None and self.lexicons[context].hit(folded_text):
                folded_text = lexicon.remove(folded_text)
        return folded_text

    def mask_folded(self, folded_text: str) -> str:
        """:meth:`mask_borderline` of what fold() returned, without checking it (remove() keeps it folded).

        Rules sharing a context lexicon ask it once while the text is unchanged (remove() returns the
        very text when it removes nothing): most text hits no context at all.
        """
        asked: Lexicon | None = None
        said = False
        for lexicon, context in self.masking:
            if context is not asked:
                asked, said = context, context.hit_folded(folded_text)
            if said:
                removed = lexicon.remove(folded_text)
                if removed is not folded_text:
                    folded_text, asked = removed, None
        return folded_text

    def sensitive_in_text(self, folded_text: str) -> list[str]:
        # (the text is not split here: on folded text a lexicon answers with one regex search)
        if not self.any_sensitive.hit(folded_text):
            return []
        return [code for code, lexicon in self.sensitive.items() if lexicon.hit(folded_text)]

    def sensitive_in_folded(self, folded_text: str) -> list[str]:
        """:meth:`sensitive_in_text` of what fold() returned (the labeller's own texts), without checking it."""
        if not self.any_sensitive.hit_folded(folded_text):
            return []
        return [code for code, lexicon in self.sensitive.items() if lexicon.hit_folded(folded_text)]


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


def _codes(value: Any, systems: Sequence[str]) -> list[str]:
    if type(value) is not dict and (value is None or type(value) is list or not isinstance(value, Mapping)):
        return []
    return [
        str(coding["code"]).upper().replace(".", "")
        for coding in value.get("coding", [])
        if coding.get("system") in systems and coding.get("code")
    ]


def _strings(node: Any) -> list[str]:
    return strings_in(node, _TEXT_SKIP)


def _text(node: Any) -> str:
    return fold_joined(_strings(node))  # fold(" ".join(...))


def _resource_text(resource: Json) -> str:
    """``_text`` of the resource without its narrative (top-level ``text``), without copying it."""
    # strings_in of a list walks its items as it walks an object's values: the same strings, same order
    return fold_joined(strings_in([v for k, v in resource.items() if k != "text" and k not in _TEXT_SKIP]))


_ICD = ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm")


_ATC = ("http://www.whocc.no/atc",)


def _coded_sensitivity(resource: Mapping[str, Any], compiled: Compiled) -> set[str]:
    found: set[str] = set()
    if (
        "medicationCodeableConcept" not in resource
        and "code" not in resource
        and "valueCodeableConcept" not in resource
        and "reasonCode" not in resource
    ):
        return found  # nothing coded to look at (an Organization, a Patient...)
    atc = _codes(resource.get("medicationCodeableConcept"), _ATC)
    icd = _codes(resource.get("code"), _ICD)
    icd.extend(_codes(resource.get("valueCodeableConcept"), _ICD))
    for reason in resource.get("reasonCode", []):
        icd.extend(_codes(reason, _ICD))
    if atc or icd:  # most resources carry neither
        for code, atc_prefixes, icd_prefixes in compiled.coded:
            if any(c.startswith(atc_prefixes) for c in atc) or any(c.startswith(icd_prefixes) for c in icd):
                found.add(code)
    return found


def activity_category(activity: Mapping[str, Any], rules: LabelRules) -> Category:
    return _activity_category(activity, rules, rules.compiled)


def _activity_category(activity: Mapping[str, Any], rules: LabelRules, compiled: Compiled) -> Category:
    detail = activity.get("detail") or {}
    code = detail.get("code") or {}
    parts = [str(detail.get("description") or ""), str(code.get("text") or "")]
    parts.extend(str(c.get("display") or "") for c in code.get("coding", []))
    text = compiled.mask_folded(fold(" ".join(parts)))
    for rule in rules.activities:
        if compiled.hits(rule.when_any, text):
            return rule.category
    return rules.fallback


def payload_category(payload: Mapping[str, Any], rules: LabelRules) -> Category:
    return _payload_category(payload, rules.compiled, rules.fallback)


def _payload_category(payload: Mapping[str, Any], compiled: Compiled, fallback: Category) -> Category:
    element_id = str(payload.get("id") or "")
    for pattern, category, plain in compiled.payload:
        if element_id == pattern if plain else fnmatch.fnmatchcase(element_id, pattern):
            return category
    return fallback


def _inline(element: Json, system: str, category: str, sensitivity: Iterable[str], rules: LabelRules) -> None:
    _inline_with(element, system, category, sensitivity, rules.sensitivity.system, rules.compiled.displays)


def _inline_with(
    element: Json,
    system: str,
    category: str,
    sensitivity: Iterable[str],
    sensitivity_system: str,
    displays: Mapping[str, str],
) -> None:
    extensions = [e for e in element.get("extension", []) if e.get("url") != INLINE_LABEL]
    extensions.append({"url": INLINE_LABEL, "valueCoding": _coding(system, category)})
    for code in sorted(sensitivity):
        extensions.append(
            {"url": INLINE_LABEL, "valueCoding": _coding(sensitivity_system, code, displays.get(code, code))}
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
    # everything the loops read, once: a pydantic private attribute (rules.compiled, behind
    # rules.display) is slow to reach, and the rule fields are asked for every resource
    compiled = rules.compiled
    displays = compiled.displays
    kinds = rules.resources
    fallback = rules.fallback
    system = rules.system
    text_in = rules.sensitivity.text_in
    sensitivity_system = rules.sensitivity.system
    sensitive_in_text = compiled.sensitive_in_folded  # every text below is fold()'s output
    own: dict[str, set[str]] = {}
    inline: dict[int, tuple[str, set[str]]] = {}
    for res in resources:
        found = _coded_sensitivity(res, compiled)
        resource_type = res["resourceType"]
        kind = kinds.get(resource_type, fallback)
        if kind == "by-element":
            if resource_type == "CarePlan":
                for activity in res.get("activity") or []:
                    codes = set(sensitive_in_text(_text(activity.get("detail", {}))))
                    inline[id(activity)] = (_activity_category(activity, rules, compiled), codes)
                    found |= codes
        elif resource_type in text_in:
            found |= set(sensitive_in_text(_resource_text(res)))
        own[res["id"]] = found
    drugs = set().union(*(own[r["id"]] for r in resources if r["resourceType"] == "MedicationStatement"))
    plan = set().union(*(own[r["id"]] for r in resources if r["resourceType"] == "CarePlan"))
    letter = set().union(*own.values())
    confidentiality_coding = _coding(CONFIDENTIALITY, confidentiality) if confidentiality else None
    for res in resources:
        resource_type = res["resourceType"]
        kind = kinds.get(resource_type, fallback)
        categories: list[str] = []
        sensitivity = set(own[res["id"]])
        if resource_type == "List":
            sensitivity |= drugs
        elif resource_type in ("DocumentReference", "OperationOutcome"):
            sensitivity |= letter  # the original letter and the report contain everything
        if kind == "by-element":
            if resource_type == "CarePlan":
                for activity in res.get("activity") or []:
                    category, codes = inline[id(activity)]
                    _inline_with(activity, system, category, codes, sensitivity_system, displays)
                    categories.append(category)
            else:
                for payload in res.get("payload") or []:
                    category = _payload_category(payload, compiled, fallback)
                    element_id = str(payload.get("id") or "")
                    if element_id in _DRUG_PAYLOADS:
                        codes = drugs if element_id != "original" else letter
                    elif element_id in _PLAN_PAYLOADS:
                        codes = plan
                    else:
                        codes = set(sensitive_in_text(_text(payload)))
                    _inline_with(payload, system, category, codes, sensitivity_system, displays)
                    categories.append(category)
                    sensitivity |= codes
            if not categories:
                categories.append(fallback)
        else:
            categories.append(kind)
        if len(categories) == 1:  # (most resources: one category, no sensitivity)
            security = [{"system": system, "code": categories[0]}]
        else:
            security = [_coding(system, c) for c in dict.fromkeys(categories)]
        if confidentiality_coding is not None:
            security.append(dict(confidentiality_coding))
        if sensitivity:
            security.extend(_coding(sensitivity_system, c, displays.get(c, c)) for c in sorted(sensitivity))
        _set_meta(res, security)


def _set_meta(res: Json, security: list[Json]) -> None:
    """``res["meta"]["security"] = security``, "meta" placed right after "id" for readable output."""
    if "meta" not in res and next(iter(res), None) == "resourceType":
        # the builder's resources (resourceType, id, ...): rebuilt once, in that order
        items = list(res.items())
        if len(items) > 1 and items[1][0] == "id":
            res.clear()
            res["resourceType"] = items[0][1]
            res["id"] = items[1][1]
            res["meta"] = {"security": security}
            res.update(items[2:])
            return
    res["meta"] = {**res.get("meta", {}), "security": security}
    ordered: dict[str, Any] = {k: res[k] for k in ("resourceType", "id", "meta") if k in res}
    ordered.update({k: v for k, v in res.items() if k not in ordered})
    res.clear()
    res.update(ordered)
