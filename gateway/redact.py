"""Stage — redact: cut one recipient's view out of the labelled letter (Content Filter).

Given a :class:`~gateway.consent.Decision`, keep only the resources and elements whose data category
(and sensitivity codes) the recipient may receive; rebuild the recipient's own Communication and
CarePlan from allowed elements only; remove every reference to what was withheld; and, for a
recipient without medical rights, scan the free text left in social and logistics elements for
medical content (drug names of this letter, a lexicon in ``mappings/medical-lexicon.yaml``, ATC and
CIM-10 code shapes).  Everything withheld is listed with the rule or Consent version that decided it,
for the audit.

Views never modify the shared translated resources: a resource that must change is copied first.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from gateway.consent import Decision
from gateway.directory import Recipient
from gateway.errors import MappingLoadError, Where
from gateway.label import (
    CONFIDENTIALITY,
    INLINE_LABEL,
    LabelRules,
    categories_of,
    inline_category,
    inline_sensitivity,
)
from gateway.mappings import Mappings
from gateway.route import Routed
from gateway.text import Lexicon, fold, strings_in
from gateway.translate import narrative as nv
from gateway.translate.ids import resource_id

__all__ = ["MedicalScanner", "View", "Withheld", "cut", "scanner_from"]

Json = dict[str, Any]
SENSITIVITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


@dataclass(frozen=True, slots=True)
class Withheld:
    """One thing a recipient did not get, and why."""

    what: str  # "MedicationStatement/<id>" or "CarePlan/<id>#activity-x"
    resource_type: str
    category: str  # the category or sensitivity code that excluded it ("medical", "PSY", "free-text")
    rule: str
    reason: str
    consent: str | None = None


@dataclass
class View:
    """What one recipient receives: resources (Communication first) and what was held back."""

    recipient: Recipient
    decision: Decision
    resources: list[Json] = field(default_factory=list)
    withheld: list[Withheld] = field(default_factory=list)
    communication: Json | None = None
    changed: set[str] = field(default_factory=set)  # ids of resources built or altered for this view
    checked: set[str] = field(default_factory=set)  # of those, the ones redaction already proved valid


class _RulesMemo:
    """One letter's verdicts under one set of label rules: every recipient of the letter asks the same."""

    __slots__ = ("mask", "rules", "scrubbed", "texts", "verdicts")

    def __init__(self, rules: LabelRules) -> None:
        self.rules = rules  # held, so the id it is found by stays its own
        self.mask = rules.compiled.mask_folded  # reached once: pydantic's private attributes are slow
        self.texts: dict[str, str | None] = {}  # a string -> its verdict
        self.verdicts: dict[tuple[int, str], str | None] = {}  # (shared resource, element) -> verdict
        self.scrubbed: dict[int, _Trim | None] = {}  # shared resource -> what its free text costs it


# what a resource's medical free text costs it: (element -> verdict, the trimmed copy or None when withheld whole)
_Trim = tuple[dict[str, str], Json | None]


class MedicalScanner:
    """Finds medical content in free text (compiled once per mapping set, plus the letter's drugs).

    The scanner :meth:`with_drugs` makes for a letter also remembers, for that letter only, what its
    recipients' cuts ask again and again (verdicts, labels, references, trimmed and pruned copies).
    It lives as long as the letter's :class:`~gateway.pipeline.Prepared`, and may be used from several
    threads: each table is only read or filled with ``setdefault`` (atomic), and a race only computes the
    same pure value twice.  Memoised copies are shared by the letter's views, which never mutate them.
    """

    def __init__(self, terms: Iterable[str], patterns: Mapping[str, str]) -> None:
        self._terms = Lexicon(terms)
        self._drugs = Lexicon(())
        self._patterns = [(name, re.compile(p, re.IGNORECASE)) for name, p in patterns.items()]
        self._any_pattern = _union(patterns.values())
        self._letter = False  # True for the scanner of one letter (with_drugs): only that one memoises
        self._shared: dict[int, Mapping[str, Any]] = {}  # the letter's resources (and memoised copies) by id
        self._references: dict[int, frozenset[str]] = {}
        self._labels: dict[int, tuple[frozenset[str], frozenset[str]]] = {}
        self._pruned: dict[tuple[int, frozenset[str]], Json | None] = {}
        self._by_rules: dict[int, _RulesMemo] = {}

    def _is_shared(self, resource: Mapping[str, Any]) -> bool:
        return self._shared.get(id(resource)) is resource

    def _share(self, resource: Json) -> Json:
        """Hold a memoised copy like the letter's own resources (so its id keys memos too)."""
        self._shared.setdefault(id(resource), resource)
        return resource

    def _memo(self, rules: LabelRules) -> _RulesMemo:
        found = self._by_rules.get(id(rules))
        if found is None:
            found = _RulesMemo(rules)
            if self._letter:  # never the mapping set's scanner: its memo would outlive the letter
                found = self._by_rules.setdefault(id(rules), found)
        return found

    def labels(self, resource: Mapping[str, Any], system: str) -> tuple[frozenset[str], frozenset[str]]:
        """(data categories, sensitivity codes) of a resource (memoised for the letter's shared resources)."""
        found = self._labels.get(id(resource)) if self._is_shared(resource) else None
        if found is None:
            found = (frozenset(categories_of(resource, system)), frozenset(_sensitivity(resource)))
            if self._is_shared(resource):
                found = self._labels.setdefault(id(resource), found)
        return found

    def text_verdict(self, text: str, rules: LabelRules) -> str | None:
        """Medical content in one piece of free text (borderline terms its context allows are ignored)."""
        return self._text_verdict(self._memo(rules), text)

    def _text_verdict(self, memo: _RulesMemo, text: str) -> str | None:
        texts = memo.texts
        if text in texts:
            return texts[text]
        return texts.setdefault(text, self.hit_folded(memo.mask(fold(text))))

    def element_verdict(self, owner: Mapping[str, Any], key: str, rules: LabelRules) -> str | None:
        """Medical content in ``owner[key]`` (memoised for the letter: resources are shared, not mutated)."""
        return self._element_verdict(self._memo(rules), owner, key, self._is_shared(owner))

    def _element_verdict(self, memo: _RulesMemo, owner: Mapping[str, Any], key: str, shared: bool) -> str | None:
        memo_key = (id(owner), key)
        if shared and memo_key in memo.verdicts:
            return memo.verdicts[memo_key]
        # one fold for the whole element: a phrase straddling two of its strings only errs on the safe side
        found = self._text_verdict(memo, " ".join(_strings(owner[key])))
        if shared:
            memo.verdicts[memo_key] = found
        return found

    def scrubbed(self, resource: Json, rules: LabelRules) -> _Trim | None:
        """What medical free text costs a resource (None: nothing), the same for every recipient of the letter."""
        memo = self._memo(rules)
        if not self._is_shared(resource):
            return _trim(resource, self, rules)
        if id(resource) in memo.scrubbed:
            return memo.scrubbed[id(resource)]
        found = memo.scrubbed.setdefault(id(resource), _trim(resource, self, rules))
        if found is not None and found[1] is not None:
            self._share(found[1])
        return found

    def references(self, resource: Mapping[str, Any]) -> frozenset[str]:
        """Every reference inside a resource (memoised for the letter)."""
        if not self._is_shared(resource):
            return frozenset(_all_references(resource))
        found = self._references.get(id(resource))
        if found is None:
            found = self._references.setdefault(id(resource), frozenset(_all_references(resource)))
        return found

    def pruned(self, resource: Json, gone: frozenset[str]) -> Json | None:
        """The resource without its references to ``gone`` (None: not valid without them).

        ``gone`` is exactly the removed resources it refers to, so the answer is the same whatever else
        a recipient lost: memoised for the letter.
        """
        if not self._is_shared(resource):
            return _pruned_valid(resource, gone)
        key = (id(resource), gone)
        if key in self._pruned:
            return self._pruned[key]
        found = self._pruned.setdefault(key, _pruned_valid(resource, gone))
        return found if found is None else self._share(found)

    def with_drugs(self, resources: Sequence[Mapping[str, Any]]) -> MedicalScanner:
        """A scanner for one letter: it also knows every drug name of the letter, and remembers for it."""
        names: set[str] = set()
        for res in resources:
            if res["resourceType"] != "MedicationStatement":
                continue
            concept = res.get("medicationCodeableConcept") or {}
            texts = [concept.get("text") or "", *(c.get("display") or "" for c in concept.get("coding", []))]
            for text in texts:
                names.update(
                    w for w in fold(text).split() if len(w) >= 4 and not w.isdigit() and w not in _DOSAGE_FORM_WORDS
                )
        scanner = copy.copy(self)
        scanner._letter = True
        scanner._references = {}
        scanner._labels = {}
        scanner._pruned = {}
        scanner._by_rules = {}
        scanner._shared = {id(r): r for r in resources}  # held, so their ids stay unique while memoised
        if names:
            scanner._drugs = Lexicon(sorted(names))
        return scanner

    def hit(self, folded: str) -> str | None:
        """The kind of medical content in already folded text ('lexicon', 'letter-drug', 'atc'...), or None.

        Any text (by words); the cut asks :meth:`hit_folded`, which the tests check against this.
        """
        tokens = folded.split()
        if self._terms.hit(folded, tokens):
            return "lexicon"
        return self._drug_or_pattern(folded, tokens)

    def hit_folded(self, folded: str) -> str | None:
        """:meth:`hit` of what fold() returned, unchecked: the mapping set's lexicon in one regex search."""
        if self._terms.hit_folded(folded):
            return "lexicon"
        return self._drug_or_pattern(folded, folded.split())

    def _drug_or_pattern(self, folded: str, tokens: list[str]) -> str | None:
        # (the letter's drug lexicon is matched by words: its regex would be compiled anew for each letter)
        if self._drugs.hit(folded, tokens):
            return "letter-drug"
        if self._any_pattern is not None and self._any_pattern.search(folded) is None:
            return None  # one search says none of the patterns is there (most text)
        for name, pattern in self._patterns:
            if pattern.search(folded):
                return name
        return None


def _union(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching wherever one of the patterns would (None when they cannot be safely joined).

    Joined as alternatives, group numbers shift: patterns that refer to a group are left alone.
    """
    texts = list(patterns)
    if not texts or any(re.search(r"\\[0-9]|\(\?P=|\(\?\(", p) for p in texts):
        return None
    try:
        return re.compile("|".join(f"(?:{p})" for p in texts), re.IGNORECASE)
    except re.error:
        return None


# words of a drug's name that say its form, not the drug: common in logistics text, never telling
_DOSAGE_FORM_WORDS = frozenset(
    [
        "comprime",
        "comprimes",
        "gelule",
        "gelules",
        "solution",
        "buvable",
        "injectable",
        "poudre",
        "sachet",
        "sachets",
        "secable",
        "pellicule",
        "pellicules",
        "enrobe",
        "flacon",
        "seringue",
        "seringues",
        "preremplie",
        "unite",
        "unites",
        "dose",
        "doses",
        "forme",
        "orale",
        "voie",
    ]
)

_SCANNERS: dict[str, MedicalScanner] = {}


def scanner_from(mappings: Mappings) -> MedicalScanner:
    if mappings.digest in _SCANNERS:
        return _SCANNERS[mappings.digest]
    data = mappings.raw.get("medical-lexicon.yaml")
    if not isinstance(data, Mapping) or not isinstance(data.get("terms"), Mapping):
        raise MappingLoadError("medical-lexicon.yaml is missing or has no terms", where=Where(source="mappings"))
    terms = [t for group in data["terms"].values() for t in group]
    patterns = data.get("patterns") or {}
    try:
        scanner = MedicalScanner(terms, patterns)
    except re.error as exc:
        raise MappingLoadError(
            f"bad pattern in medical-lexicon.yaml: {exc}", where=Where(source="medical-lexicon.yaml")
        ) from None
    _SCANNERS[mappings.digest] = scanner
    return scanner


def _sensitivity(resource: Mapping[str, Any]) -> set[str]:
    return {
        str(c["code"]) for c in resource.get("meta", {}).get("security", []) if c.get("system") == SENSITIVITY_SYSTEM
    }


_SKIP = frozenset({"system", "reference", "url", "div", "id", "data"})


def _strings(node: Any) -> list[str]:
    return strings_in(node, _SKIP)


def _prune_references(node: Any, removed: Set[str]) -> Any:
    """A copy of ``node`` without what refers to a removed resource.

    A list item that refers to one anywhere inside goes whole (a List entry, an activity, a
    participant); a single element that is such a reference goes; the caller validates the result.
    Every dict and list of the result is new.
    """
    return _pruned_node(node, removed)[0]


def _pruned_node(node: Any, removed: Set[str]) -> tuple[Any, bool]:
    """(:func:`_prune_references` of ``node``, whether ``node`` refers to a removed resource anywhere).

    One walk for both: a list needs to know which items refer to one before keeping the others.
    """
    if isinstance(node, dict):
        ref = node.get("reference")
        refers = isinstance(ref, str) and ref in removed
        out = {}
        for key, value in node.items():
            if type(value) in _ATOMS:  # most values: kept as they are, no call
                out[key] = value
                continue
            if isinstance(value, dict) and isinstance(value.get("reference"), str) and value["reference"] in removed:
                refers = True
                continue
            pruned, inner = _pruned_node(value, removed)
            refers = refers or inner
            if pruned not in ([], {}):
                out[key] = pruned
        return out, refers
    if isinstance(node, list):
        items = []
        refers = False
        for item in node:
            if type(item) in _ATOMS:
                items.append(item)
                continue
            pruned, inner = _pruned_node(item, removed)
            if inner:
                refers = True
            else:
                items.append(pruned)
        return items, refers
    return node, False


def _pruned_valid(resource: Json, gone: Set[str]) -> Json | None:
    """The resource without its references to ``gone``, or None when that leaves it invalid."""
    from gateway import validate

    pruned: Json = _prune_references(resource, gone)
    return None if validate.problems(pruned, fhir_json=True) else pruned


def _all_references(node: Any) -> list[str]:
    found: list[str] = []
    stack = [node]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str):
                found.append(ref)
            values: Iterable[Any] = item.values()
        elif isinstance(item, list):
            values = item
        else:
            continue
        for value in values:
            if isinstance(value, _CONTAINERS):
                push(value)
    return found


_CONTAINERS = (dict, list)
_ATOMS = frozenset({str, int, float, bool, type(None)})


def _copy_json(node: Any) -> Any:
    """``copy.deepcopy`` for JSON values, without its memo (several times faster); other values go to it."""
    kind = type(node)
    if kind is dict:
        return {key: value if type(value) in _ATOMS else _copy_json(value) for key, value in node.items()}
    if kind is list:
        return [value if type(value) in _ATOMS else _copy_json(value) for value in node]
    if kind in _ATOMS:
        return node
    return copy.deepcopy(node)


def _urn(resource: Mapping[str, Any]) -> str:
    return f"urn:uuid:{resource['id']}"


@dataclass
class _Cutter:
    decision: Decision
    routed: Routed
    rules: LabelRules
    scanner: MedicalScanner
    view: View
    removed: set[str] = field(default_factory=set)

    @cached_property
    def medical(self) -> bool:
        return "medical" in self.decision.categories

    def withhold(self, what: str, rtype: str, category: str, reason: str | None = None) -> None:
        if category in ("medical", "social", "logistics"):
            basis = self.decision.why_not(category)
        else:
            basis = self.decision.by_sensitivity.get(category) or self.decision.why_not("medical")
        self.view.withheld.append(Withheld(what, rtype, category, basis.rule, reason or basis.text, basis.consent))

    def blocked(self, categories: Collection[str], sensitivity: Collection[str]) -> str | None:
        """The first category, then sensitivity code, this recipient may not see — in sorted order, so
        that the audit names the same one on every run (the labels come as sets)."""
        decision = self.decision
        if decision.categories.issuperset(categories) and decision.sensitive.issuperset(sensitivity):
            return None  # (most labels: nothing to sort)
        for category in sorted(categories):
            if category not in decision.categories:
                return category
        for code in sorted(sensitivity):
            if code not in decision.sensitive:
                return code
        return None

    def free_text_hit(self, element: Any) -> str | None:
        """Medical content in an element's free text (borderline terms its context allows are ignored)."""
        if self.medical:
            return None
        for text in _strings(element):
            found = self.scanner.text_verdict(text, self.rules)
            if found:
                return found
        return None


def cut(
    resources: Sequence[Json],
    decision: Decision,
    routed: Routed,
    rules: LabelRules,
    scanner: MedicalScanner,
) -> View:
    """The recipient's view of a labelled translation (never mutates ``resources``)."""
    view = View(routed.recipient, decision)
    c = _Cutter(decision, routed, rules, scanner, view)
    if "logistics" not in decision.categories:
        # identity, dates and the message envelope are logistics: without them nothing can be sent
        for res in resources:
            c.withhold(f"{res['resourceType']}/{res['id']}", res["resourceType"], "logistics")
        return view
    kept: list[Json] = []
    rebuild: list[Json] = []
    # 1. whole resources, by category and sensitivity
    for res in resources:
        rtype = res["resourceType"]
        if rtype in ("CarePlan", "Communication"):
            rebuild.append(res)
            continue
        blocked = c.blocked(*scanner.labels(res, rules.system))
        if blocked:
            c.withhold(f"{rtype}/{res['id']}", rtype, blocked)
            c.removed.add(_urn(res))
            continue
        kept.append(res)
    # 2. free text in what is left, for recipients without medical rights
    if not c.medical:
        kept = [r for r in (_scrub(res, c) for res in kept) if r is not None]
    # 3. rebuilt resources: CarePlan (allowed activities only), Communication (own), Provenance
    careplan = next((r for r in rebuild if r["resourceType"] == "CarePlan"), None)
    kept_plan = _careplan(careplan, c) if careplan else None
    if kept_plan is not None:
        kept.append(kept_plan)
    elif careplan is not None:
        c.removed.add(_urn(careplan))
    # references to withheld resources disappear from what is kept; what cannot stand without them goes too
    final = _without_dangling(kept, c)
    communication = next((r for r in rebuild if r["resourceType"] == "Communication"), None)
    if communication is not None:
        own = _communication(communication, c, final)
        view.communication = own
        final.insert(0, own)
    provenance = next((r for r in final if r["resourceType"] == "Provenance"), None)
    if provenance is not None:
        final[final.index(provenance)] = _provenance(provenance, final, view)
    view.resources = final
    return view


_KEEP_KEYS = ("resourceType", "id", "meta", "text")


def _scrub(res: Json, c: _Cutter) -> Json | None:
    """The resource without the elements whose free text looks medical (None: withheld whole)."""
    trim = c.scanner.scrubbed(res, c.rules)
    if trim is None:
        return res
    hits, trimmed = trim
    rtype = res["resourceType"]
    for key, found in hits.items():
        c.withhold(f"{rtype}/{res['id']}.{key}", rtype, "free-text", f"free text suggests medical content ({found})")
    if trimmed is None:
        c.withhold(f"{rtype}/{res['id']}", rtype, "free-text", "medical free text in a required element")
        c.removed.add(_urn(res))
        return None
    c.view.changed.add(res["id"])
    c.view.checked.add(res["id"])
    return trimmed


def _trim(res: Json, scanner: MedicalScanner, rules: LabelRules) -> _Trim | None:
    """:func:`_scrub`'s answer for a resource, which depends on the resource alone (and the letter's rules)."""
    from gateway import validate

    rtype = res["resourceType"]
    memo, shared = scanner._memo(rules), scanner._is_shared(res)
    hits: dict[str, str] = {}
    for key in res:
        if key not in _KEEP_KEYS:
            found = scanner._element_verdict(memo, res, key, shared)
            if found:
                hits[key] = found
    specialty = rtype == "PractitionerRole" and "code" in res
    if not hits and not specialty:
        return None
    trimmed = {k: v for k, v in res.items() if k not in hits}  # shallow: views never mutate shared values
    if specialty:
        # a specialty ("cardiologie") says why someone is involved: medical context
        trimmed.pop("code", None)
    trimmed["text"] = nv.generated(nv.dl(_summary(trimmed)))
    dropped = [*hits, *(["code"] if specialty else [])]
    if not validate.droppable(rtype, dropped) and validate.problems(trimmed, fhir_json=True):
        return hits, None
    return hits, trimmed


def _summary(resource: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """Label/value pairs for a regenerated narrative: the readable top-level values."""
    pairs: list[tuple[str, str | None]] = [("Ressource", str(resource["resourceType"]))]
    for key, value in resource.items():
        if key in _KEEP_KEYS:
            continue
        texts = [t for t in _strings(value) if t and len(t) < 200][:3]
        if texts:
            pairs.append((key, " · ".join(texts)))
    return pairs


def _without_dangling(kept: list[Json], c: _Cutter) -> list[Json]:
    if not c.removed:
        return list(kept)
    current = list(kept)
    while True:
        again = False
        result: list[Json] = []
        for res in current:
            gone = c.scanner.references(res) & c.removed
            if not gone:
                result.append(res)
                continue
            pruned = c.scanner.pruned(res, gone)
            if pruned is None:
                c.view.withheld.append(
                    Withheld(
                        f"{res['resourceType']}/{res['id']}",
                        res["resourceType"],
                        "dependency",
                        "policy:dependency",
                        "cannot be sent without elements withheld from this recipient",
                    )
                )
                c.removed.add(_urn(res))
                again = True
                continue
            c.view.changed.add(res["id"])
            c.view.checked.add(res["id"])
            result.append(pruned)
        current = result
        if not again:
            return current


def _careplan(plan: Json, c: _Cutter) -> Json | None:
    own = c.routed.members
    activities = []
    for activity in plan.get("activity", []):
        what = f"CarePlan/{plan['id']}#{activity.get('id')}"
        category = inline_category(activity, c.rules.system) or c.rules.fallback
        blocked = c.blocked([category], inline_sensitivity(activity, SENSITIVITY_SYSTEM))
        if blocked:
            c.withhold(what, "CarePlan", blocked)
            continue
        performers = {p.get("reference") for p in activity.get("detail", {}).get("performer", [])}
        if not c.decision.care_team and not performers & own:
            c.view.withheld.append(
                Withheld(
                    what,
                    "CarePlan",
                    category,
                    "policy:own-segment",
                    "outside the care team, a recipient sees only the activities it performs",
                )
            )
            continue
        found = c.free_text_hit(activity.get("detail", {}).get("description", ""))
        if found:
            c.withhold(what, "CarePlan", "free-text", f"free text suggests medical content ({found})")
            continue
        activities.append(activity)
    if not activities:
        c.view.withheld.append(
            Withheld(
                f"CarePlan/{plan['id']}",
                "CarePlan",
                "plan",
                "policy:nothing-left",
                "no activity of the plan is for this recipient",
            )
        )
        return None
    if len(activities) == len(plan.get("activity", [])):
        return plan
    out: Json = _copy_json({k: v for k, v in plan.items() if k != "activity"})
    out["activity"] = _copy_json(activities)
    _relabel(
        out,
        [inline_category(a, c.rules.system) or c.rules.fallback for a in activities],
        set().union(*(inline_sensitivity(a, SENSITIVITY_SYSTEM) for a in activities)),
        c.rules,
    )
    rows = [
        (
            str(a["detail"].get("description", "")),
            " – ".join(
                filter(
                    None,
                    (
                        a["detail"].get("scheduledPeriod", {}).get("start"),
                        a["detail"].get("scheduledPeriod", {}).get("end"),
                    ),
                )
            )
            or "—",
            ", ".join(p.get("display", "") for p in a["detail"].get("performer", [])) or "—",
        )
        for a in activities
    ]
    out["text"] = nv.generated(nv.table(("Action", "Quand", "Par qui"), rows, caption="Suites à donner (extrait)"))
    c.view.changed.add(out["id"])
    c.view.checked.add(out["id"])  # a subset of validated activities; tests validate every message
    return out


def _relabel(resource: Json, categories: Iterable[str], sensitivity: set[str], rules: LabelRules) -> None:
    """Labels of a rebuilt resource: the union of what it still carries (plus the confidentiality)."""
    security = resource.get("meta", {}).get("security", [])
    kept = [{"system": rules.system, "code": k} for k in dict.fromkeys(categories)]
    kept += [s for s in security if s.get("system") == CONFIDENTIALITY]
    kept += [s for s in security if s.get("system") == SENSITIVITY_SYSTEM and s.get("code") in sensitivity]
    resource.setdefault("meta", {})["security"] = kept


def _communication(source: Json, c: _Cutter, kept: Sequence[Json]) -> Json:
    """The recipient's own Communication: allowed payload elements only, addressed to it."""
    present = {_urn(r): r for r in kept}
    payload = []
    for element in source.get("payload", []):
        what = f"Communication/{source['id']}#{element.get('id')}"
        category = inline_category(element, c.rules.system) or c.rules.fallback
        target = (element.get("contentReference") or {}).get("reference")
        # a reference shows nothing itself: it goes with its target (already cut for this recipient)
        sensitivity = set() if target else inline_sensitivity(element, SENSITIVITY_SYSTEM)
        blocked = c.blocked([category], sensitivity)
        if blocked:
            c.withhold(what, "Communication", blocked)
            continue
        if target and target not in present:
            continue  # points at something withheld: already recorded there
        if target:
            element = _retag(element, present[target], c.rules)
        found = c.free_text_hit(element.get("contentString", ""))
        if found:
            c.withhold(what, "Communication", "free-text", f"free text suggests medical content ({found})")
            continue
        payload.append(element)
    recipient = c.routed.recipient
    out: Json = {
        "resourceType": "Communication",
        "id": resource_id("Communication", source["id"], recipient.id),
        "meta": {"security": list(source.get("meta", {}).get("security", []))},
    }
    skip = ("resourceType", "id", "meta", "text", "payload", "about", "recipient")
    # no copy first: pruning builds every dict and list of ``out`` anew
    out.update({k: v for k, v in source.items() if k not in skip})
    about = [a for a in source.get("about", []) if a.get("reference") in present]
    if about:
        out["about"] = about
    out = _prune_references(out, c.removed)  # subject, encounter, sender may have been withheld
    out["recipient"] = [{"reference": recipient.ref, "display": recipient.display}]
    if payload:
        out["payload"] = _copy_json(payload)
    _relabel(
        out,
        [inline_category(p, c.rules.system) or c.rules.fallback for p in payload] or ["logistics"],
        set().union(*(inline_sensitivity(p, SENSITIVITY_SYSTEM) for p in payload)),
        c.rules,
    )
    blocks = [f"<p>Destinataire : {nv.esc(recipient.display)}</p>"]
    for element in payload:
        if "contentString" in element:
            blocks.append(nv.para(element["contentString"]))
        elif "contentAttachment" in element:
            blocks.append(nv.para(f"Pièce jointe : {element['contentAttachment'].get('title', '')}"))
        elif "contentReference" in element:
            blocks.append(
                nv.para(
                    f"Voir : {element['contentReference'].get('display', element['contentReference'].get('reference'))}"
                )
            )
    if c.view.withheld:
        blocks.append(
            nv.para(f"{len(c.view.withheld)} élément(s) de la lettre ne vous sont pas transmis (droits d'accès).")
        )
    out["text"] = nv.generated(*blocks)
    c.view.changed.add(out["id"])
    c.view.checked.add(out["id"])  # built from validated parts only; tests validate every message
    return out


def _retag(element: Json, target: Mapping[str, Any], rules: LabelRules) -> Json:
    """A reference payload labelled with the sensitivity of its target as this recipient receives it."""
    wanted = sorted(_sensitivity(target))
    current = sorted(inline_sensitivity(element, SENSITIVITY_SYSTEM))
    if wanted == current:
        return element
    out: Json = _copy_json(element)
    out["extension"] = [
        e
        for e in out.get("extension", [])
        if not (e.get("url") == INLINE_LABEL and (e.get("valueCoding") or {}).get("system") == SENSITIVITY_SYSTEM)
    ]
    out["extension"] += [
        {
            "url": INLINE_LABEL,
            "valueCoding": {"system": SENSITIVITY_SYSTEM, "code": code, "display": rules.display(code)},
        }
        for code in wanted
    ]
    return out


def _provenance(source: Json, kept: Sequence[Json], view: View) -> Json:
    """The Provenance of this view: its targets are what the recipient receives."""
    present = {_urn(r) for r in kept}
    out = {k: v for k, v in source.items() if k not in ("target", "entity", "agent")}
    out["target"] = [{"reference": _urn(r)} for r in kept if r["id"] != source["id"]]
    entities = [e for e in source.get("entity", []) if e.get("what", {}).get("reference") in present]
    if entities:
        out["entity"] = entities
    out["agent"] = [
        a for a in source.get("agent", []) if not a.get("who", {}).get("reference") or a["who"]["reference"] in present
    ]
    view.changed.add(out["id"])
    view.checked.add(out["id"])  # built from validated parts only; tests validate every message
    return out
