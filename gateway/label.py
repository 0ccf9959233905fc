"""Stage 3 — label: give every resource and every mixed element its data category.

Categories (``medical``, ``social``, ``logistics``) are a project code system carried in
``meta.security`` beside the letter's HL7 confidentiality code and HL7 sensitivity codes (PSY, ETH,
HIV...).  The rules are data (``mappings/labels.yaml``); the labeller fails closed: a resource type
or an element that no rule classifies is ``medical``, so a forgotten rule can only withhold data,
never leak it.  Elements of mixed resources — ``CarePlan.activity`` and ``Communication.payload`` —
carry an inline label (DS4P ``extension-inline-sec-label``) so later stages can cut a recipient's view
element by element.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from gateway.errors import MappingLoadError, Where
from gateway.mappings import Mappings
from gateway.text import fold

__all__ = ["INLINE_LABEL", "LabelRules", "apply", "categories_of", "inline_category", "rules_from"]

INLINE_LABEL = "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-inline-sec-label"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
Category = Literal["medical", "social", "logistics"]
Json = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActivityRule(_Strict):
    category: Category
    when_any: str


class SensitivityRule(_Strict):
    code: str
    display: str
    atc: tuple[str, ...] = ()
    icd10: tuple[str, ...] = ()


class Sensitivity(_Strict):
    system: str
    rules: tuple[SensitivityRule, ...]


class LabelRules(_Strict):
    system: str
    fallback: Literal["medical"]
    resources: dict[str, Category | Literal["by-element"]]
    payload: dict[str, Category]
    activities: tuple[ActivityRule, ...]
    lexicons: dict[str, tuple[str, ...]]
    sensitivity: Sensitivity
    _patterns: dict[str, re.Pattern[str]] = PrivateAttr(default_factory=dict)

    def model_post_init(self, _context: Any) -> None:
        for rule in self.activities:
            if rule.when_any not in self.lexicons:
                raise ValueError(f"activity rule names unknown lexicon {rule.when_any!r}")
        self._patterns = {name: _pattern(terms) for name, terms in self.lexicons.items()}

    def hits(self, lexicon: str, folded_text: str) -> bool:
        """Whether the (folded) text contains a term of the lexicon, as a whole word or a stem."""
        return self._patterns[lexicon].search(folded_text) is not None


def rules_from(mappings: Mappings) -> LabelRules:
    """The label rules of a mapping set, validated (MappingLoadError when broken)."""
    return _rules(mappings.digest, mappings)


_CACHE: dict[str, LabelRules] = {}


def _rules(digest: str, mappings: Mappings) -> LabelRules:
    if digest in _CACHE:
        return _CACHE[digest]
    data = mappings.raw.get("labels.yaml")
    if data is None:
        raise MappingLoadError("labels.yaml is missing", where=Where(source="mappings"))
    try:
        rules = LabelRules.model_validate(data)
    except (ValidationError, ValueError) as exc:
        raise MappingLoadError(f"invalid label rules: {exc}", where=Where(source="labels.yaml")) from None
    _CACHE[digest] = rules
    return rules


def _pattern(terms: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = []
    for term in terms:
        folded = fold(term, keep="*")
        if folded.endswith("*"):
            alternatives.append(re.escape(folded[:-1].rstrip()))
        else:
            alternatives.append(re.escape(folded) + r"\b")
    return re.compile(r"\b(?:" + "|".join(alternatives) + ")")


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


def _sensitivities(resource: Json, rules: LabelRules) -> list[Json]:
    atc = list(_codes(resource.get("medicationCodeableConcept"), ("http://www.whocc.no/atc",)))
    icd: list[str] = []
    for key in ("code", "valueCodeableConcept"):
        icd.extend(_codes(resource.get(key), ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm")))
    for reason in resource.get("reasonCode", []):
        icd.extend(_codes(reason, ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm")))
    out = []
    for rule in rules.sensitivity.rules:
        if any(code.startswith(p) for code in atc for p in rule.atc) or any(
            code.startswith(p) for code in icd for p in rule.icd10
        ):
            out.append(_coding(rules.sensitivity.system, rule.code, rule.display))
    return out


def activity_category(activity: Mapping[str, Any], rules: LabelRules) -> Category:
    detail = activity.get("detail") or {}
    parts = [str(detail.get("description") or "")]
    code = detail.get("code") or {}
    parts.append(str(code.get("text") or ""))
    parts.extend(str(c.get("display") or "") for c in code.get("coding", []))
    text = fold(" ".join(parts))
    for rule in rules.activities:
        if rules.hits(rule.when_any, text):
            return rule.category
    return rules.fallback


def payload_category(payload: Mapping[str, Any], rules: LabelRules) -> Category:
    element_id = str(payload.get("id") or "")
    for pattern, category in rules.payload.items():
        if fnmatch.fnmatchcase(element_id, pattern):
            return category
    return rules.fallback


def _inline(element: Json, system: str, category: Category) -> None:
    extensions = [e for e in element.get("extension", []) if e.get("url") != INLINE_LABEL]
    extensions.append({"url": INLINE_LABEL, "valueCoding": _coding(system, category)})
    element["extension"] = extensions


def inline_category(element: Mapping[str, Any], system: str) -> str | None:
    """The inline data-category label of an element, or None."""
    for ext in element.get("extension", []):
        coding = ext.get("valueCoding") or {}
        if ext.get("url") == INLINE_LABEL and coding.get("system") == system:
            return str(coding.get("code"))
    return None


def categories_of(resource: Mapping[str, Any], system: str) -> set[str]:
    return {str(c["code"]) for c in resource.get("meta", {}).get("security", []) if c.get("system") == system}


def apply(resources: Sequence[Json], rules: LabelRules, confidentiality: str | None = None) -> None:
    """Label every resource in place (the dicts are fresh from the builder and owned by this stage)."""
    sensitive: dict[str, list[Json]] = {}
    for res in resources:
        found = _sensitivities(res, rules)
        if found:
            sensitive[f"urn:uuid:{res['id']}"] = found
    for res in resources:
        kind = rules.resources.get(res["resourceType"], rules.fallback)
        categories: list[Category] = []
        extra: list[Json] = list(sensitive.get(f"urn:uuid:{res['id']}", []))
        if kind == "by-element":
            elements = res.get("activity") if res["resourceType"] == "CarePlan" else res.get("payload")
            for element in elements or []:
                category = (
                    activity_category(element, rules)
                    if res["resourceType"] == "CarePlan"
                    else payload_category(element, rules)
                )
                _inline(element, rules.system, category)
                if category not in categories:
                    categories.append(category)
            if not categories:
                categories.append(rules.fallback)
        else:
            categories.append(kind)
        if res["resourceType"] in ("List", "Communication"):
            # they show the drugs of the table: carry the drugs' sensitivity codes too
            for labels in sensitive.values():
                extra.extend(labels)
        security = [_coding(rules.system, c) for c in categories]
        if confidentiality:
            security.append(_coding(CONFIDENTIALITY, confidentiality))
        seen: set[tuple[str, str]] = set()
        unique = []
        for coding in (*security, *extra):
            key = (coding["system"], coding["code"])
            if key not in seen:
                seen.add(key)
                unique.append(coding)
        meta = res.setdefault("meta", {})
        meta["security"] = unique
        # keep "meta" right after "id" for readable output
        ordered: dict[str, Any] = {k: res[k] for k in ("resourceType", "id", "meta") if k in res}
        ordered.update({k: v for k, v in res.items() if k not in ordered})
        res.clear()
        res.update(ordered)
