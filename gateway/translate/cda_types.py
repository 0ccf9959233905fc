"""Read HL7 v3 CDA data types (II, TS, CD, PQ, PIVL_TS, PN, AD, TEL) into the neutral model.

Shared by every CDA adapter (CI-SIS and C-CDA).  The readers are lenient where real letters are
sloppy (a reference without ``#``, a time without a zone, a code without a system) and record each
leniency as an :class:`~gateway.model.Issue` so the output says what was assumed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

from lxml import etree

from gateway.mappings import CDA_NS, Mappings
from gateway.model import (
    Address,
    Code,
    Concept,
    Dose,
    Ident,
    Issue,
    Name,
    Organization,
    Practitioner,
    Ratio,
    Telecom,
    Timepoint,
    Timing,
)

__all__ = ["CdaContext", "child", "children", "q", "text_of"]

NS = {"h": CDA_NS, "xsi": "http://www.w3.org/2001/XMLSchema-instance"}
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d+)?([+-]\d{4}|Z)?$")
_SPACES = re.compile(r"\s+")
# the (no-namespace) ID attributes of the element and its descendants, as el.get("ID") reads them; one
# compiled XPath per thread (an evaluator serialises its calls: threads reading letters never wait)
_ID_XPATH = "descendant-or-self::*/@ID"
_PER_THREAD = threading.local()


def _id_attributes(root: etree._Element) -> Any:
    evaluator = getattr(_PER_THREAD, "ids", None)
    if evaluator is None:
        evaluator = _PER_THREAD.ids = etree.XPath(_ID_XPATH)
    return evaluator(root)


class _Clark(dict[str, str]):
    """CDA tag → Clark name, made once per tag (the tags are the reader's own constants)."""

    def __missing__(self, tag: str) -> str:
        name = self[tag] = f"{{{CDA_NS}}}{tag}"
        return name


_CLARK = _Clark()


def q(tag: str) -> str:
    """Clark name of a CDA element: ``q("id")`` → ``{urn:hl7-org:v3}id``."""
    return _CLARK[tag]


def child(element: etree._Element, *path: str) -> etree._Element | None:
    """The first element at a path of CDA tags: ``child(e, "a", "b")`` is ``e.find("{ns}a/{ns}b")``.

    Walking the children directly is several times cheaper than ``find``, which parses its ElementPath
    on every call; a letter makes hundreds of these lookups (the CDA reader asks :meth:`CdaContext.child`,
    which also remembers each element's children).
    """
    if len(path) == 1:
        return next(element.iterchildren(_CLARK[path[0]]), None)
    return next(_descend(element, path), None)


def children(element: etree._Element, *path: str) -> list[etree._Element]:
    """Every element at a path of CDA tags, in document order: ``e.findall("{ns}a/{ns}b")``."""
    if len(path) == 1:
        return list(element.iterchildren(_CLARK[path[0]]))
    return list(_descend(element, path))


def _descend(element: etree._Element, path: tuple[str, ...]) -> Iterator[etree._Element]:
    found: Iterator[etree._Element] = element.iterchildren(_CLARK[path[0]])
    if len(path) == 1:
        return found
    return (deeper for el in found for deeper in _descend(el, path[1:]))


def text_of(element: etree._Element | None) -> str:
    """All text under an element, whitespace collapsed (narrative markup flattened)."""
    if element is None:
        return ""
    if len(element) == 0:  # a leaf (most calls): its own text, without the itertext generator
        return " ".join((element.text or "").split())
    # "".join(element.itertext()) from libxml2 in one call (the text of every descendant, the tails of
    # the children, not the element's own tail): itertext makes a proxy object per descendant
    text: str = etree.tostring(element, method="text", encoding="unicode", with_tail=False)
    return " ".join(text.split())


_NO_CONCEPT = Concept()  # immutable: shared by every absent code
_NO_KIDS: Mapping[Any, list[etree._Element]] = MappingProxyType({})  # a leaf's children
_NATIONAL_ID_TYPES = frozenset({"IDNPS", "IDNST"})  # the identifiers _derived_national_ids derives from
_Q_ADDR, _Q_CITY, _Q_CODE, _Q_COUNTRY, _Q_FAMILY, _Q_GIVEN = map(
    q, ("addr", "city", "code", "country", "family", "given")
)
_Q_HIGH, _Q_LOW, _Q_NAME, _Q_POSTAL_CODE, _Q_PREFIX = map(q, ("high", "low", "name", "postalCode", "prefix"))
_Q_INDUSTRY, _Q_INFORMATION_RECIPIENT = q("standardIndustryClassCode"), q("informationRecipient")
_Q_ORIGINAL_TEXT, _Q_TELECOM, _Q_TRANSLATION = q("originalText"), q("telecom"), q("translation")
_Q_RECEIVED_ORGANIZATION, _Q_REPRESENTED_ORGANIZATION = q("receivedOrganization"), q("representedOrganization")


def _first(kids: Mapping[Any, list[etree._Element]], tag: str) -> etree._Element | None:
    """The first child with that Clark name, from an element's :meth:`CdaContext.kids`."""
    found = kids.get(tag)
    return found[0] if found else None


@dataclass
class CdaContext:
    """Per-document reading state: mappings, narrative id index, time zone policy, issues found."""

    mappings: Mappings
    root: etree._Element
    source: str
    default_zone: str = "Europe/Paris"
    issues: list[Issue] = field(default_factory=list)
    _ids: dict[str, etree._Element] | None = None
    table_headers: dict[etree._Element, tuple[str, ...]] = field(default_factory=dict)  # memo of the CDA reader
    _zone_warned: bool = False
    # element -> its child elements by Clark name, in document order: the reader asks most elements for
    # several of their children (a drug entry for ten), and each walk of an lxml element's children
    # makes a proxy object and a tag string per child; an element's walk is done once here.  The tree
    # is never changed while it is read, and the keys keep the proxies (hence their identity) alive.
    _kids: dict[etree._Element, dict[Any, list[etree._Element]]] = field(default_factory=dict)
    _systems: dict[str, str] = field(default_factory=dict)  # memo of system(): OID -> code system URI
    _times: dict[str, tuple[str, Timepoint | None]] = field(default_factory=dict)  # memo of ts(), by value

    # -- child elements ----------------------------------------------------------------------------
    def _children_of(self, element: etree._Element) -> dict[Any, list[etree._Element]]:
        kids: dict[Any, list[etree._Element]] = {}
        for el in element:
            tag = el.tag
            same = kids.get(tag)
            if same is None:
                kids[tag] = [el]
            else:
                same.append(el)
        self._kids[element] = kids
        return kids

    def kids(self, element: etree._Element) -> Mapping[Any, list[etree._Element]]:
        """The child elements of an element by Clark name, each list in document order."""
        kids = self._kids.get(element)
        if kids is None:
            if not len(element):
                return _NO_KIDS
            kids = self._children_of(element)
        return kids

    def child(self, element: etree._Element, *path: str) -> etree._Element | None:
        """:func:`child` (``element.find`` of a CDA path), from the remembered children."""
        kids = self._kids.get(element)
        if kids is None:
            if not len(element):  # a leaf (a third of the lookups): nothing to remember
                return None
            kids = self._children_of(element)
        found = kids.get(_CLARK[path[0]])
        if not found:
            return None
        if len(path) == 1:
            return found[0]
        rest = path[1:]
        for el in found:  # depth first, in document order, as find does
            deeper = self.child(el, *rest)
            if deeper is not None:
                return deeper
        return None

    def children(self, element: etree._Element, *path: str) -> list[etree._Element]:
        """:func:`children` (``element.findall`` of a CDA path), from the remembered children."""
        kids = self._kids.get(element)
        if kids is None:
            if not len(element):
                return []
            kids = self._children_of(element)
        found = kids.get(_CLARK[path[0]])
        if found is None:
            return []
        for step in path[1:]:
            tag = _CLARK[step]
            deeper: list[etree._Element] = []
            for parent in found:
                below = self._kids.get(parent)
                if below is None:
                    if not len(parent):
                        continue
                    below = self._children_of(parent)
                deeper.extend(below.get(tag, ()))
            found = deeper
        return list(found)

    # -- issues ------------------------------------------------------------------------------------
    def note(self, severity: str, code: str, text: str, element: etree._Element | None = None) -> None:
        where = f"{self.source}:{element.sourceline}" if element is not None and element.sourceline else ""
        self.issues.append(Issue(severity, code, text, where))  # type: ignore[arg-type]

    # -- narrative references ----------------------------------------------------------------------
    def narrative(self, reference: str | None) -> etree._Element | None:
        """The narrative element a ``reference/@value`` points at, with or without the leading '#'."""
        if not reference:
            return None
        if self._ids is None:
            # every ID attribute in document order (the first element wins), found by libxml2: cheaper
            # than reading the attribute of each element from Python, or than the XPath //*[@ID]
            self._ids = {}
            for attribute in _id_attributes(self.root):  # attribute values ("smart" strings: they know their element)
                self._ids.setdefault(str(attribute), attribute.getparent())
        key = reference.strip()
        key = key[1:] if key.startswith("#") else key
        return self._ids.get(key)

    # -- identifiers -------------------------------------------------------------------------------
    def ident(self, element: etree._Element | None) -> Ident | None:
        if element is None or element.get("nullFlavor") is not None:
            return None
        root, ext = element.get("root"), element.get("extension")
        if not root:
            return None
        if ext is None or not ext.strip():
            value = f"urn:uuid:{root.lower()}" if "-" in root else f"urn:oid:{root}"
            return Ident("urn:ietf:rfc:3986", value)
        entry = self.mappings.code("identifier-systems").lookup(root)
        if isinstance(entry, dict):
            return Ident(entry["system"], ext.strip(), entry.get("type"), entry.get("use"))
        return Ident(f"urn:oid:{root}", ext.strip())

    def idents(self, parent: etree._Element | None, tag: str = "id") -> tuple[Ident, ...]:
        if parent is None:
            return ()
        out: list[Ident] = []
        for element in self.kids(parent).get(_CLARK[tag], ()):
            ident = self.ident(element)
            if ident is None:
                continue
            out.append(ident)
            if ident.type_code in _NATIONAL_ID_TYPES:
                out.extend(_derived_national_ids(ident))
        return tuple(dict.fromkeys(out)) if len(out) > 1 else tuple(out)

    # -- codes -------------------------------------------------------------------------------------
    def system(self, oid: str | None) -> str | None:
        if not oid:
            return None
        found = self._systems.get(oid)  # a letter names a handful of code systems, many times each
        if found is None:
            mapped = self.mappings.code("code-systems").lookup(oid)
            found = self._systems[oid] = mapped if isinstance(mapped, str) and ":" in mapped else f"urn:oid:{oid}"
        return found

    def concept(self, element: etree._Element | None) -> Concept:
        if element is None:
            return _NO_CONCEPT
        codings: list[Code] = []
        kids = self.kids(element)
        for el in (element, *kids.get(_Q_TRANSLATION, ())):
            code, system = el.get("code"), self.system(el.get("codeSystem"))
            if code and system and el.get("nullFlavor") is None:
                codings.append(Code(system, code.strip(), el.get("displayName")))
        text = None
        originals = kids.get(_Q_ORIGINAL_TEXT)
        if originals:
            original = originals[0]
            ref = self.child(original, "reference")
            text = text_of(self.narrative(ref.get("value"))) if ref is not None else None
            text = text or text_of(original) or None
        if text is None and codings and codings[0].display:
            text = codings[0].display
        return Concept(tuple(codings), text)

    # -- times -------------------------------------------------------------------------------------
    def ts(self, element: etree._Element | None, attr: str = "value") -> Timepoint | None:
        """A CDA TS as a FHIR date/dateTime; a time without zone gets the configured zone (and an issue)."""
        if element is None or element.get("nullFlavor") is not None:
            return None
        raw = (element.get(attr) or "").strip()
        if not raw:
            return None
        found = self._times.get(raw)  # a letter repeats its dates (the letter's own, the stay's...)
        if found is None:
            found = self._times[raw] = self._read_ts(raw)
        verdict, point = found
        if verdict == "unreadable":
            self.note("warning", "value", f"unreadable timestamp {raw!r} ignored", element)
        elif verdict == "impossible":
            self.note("warning", "value", f"impossible date {raw!r} ignored", element)
        elif verdict == "zone-assumed" and not self._zone_warned:
            self._zone_warned = True
            self.note(
                "warning",
                "value",
                f"timestamp {raw!r} has a time but no time zone; {self.default_zone} assumed "
                "(applies to every such timestamp in this letter)",
                element,
            )
        return point

    def _read_ts(self, raw: str) -> tuple[str, Timepoint | None]:
        """(verdict, value) of a stripped, non-empty TS: ok, zone-assumed, unreadable or impossible."""
        match = _TS.match(raw)
        if not match:
            return "unreadable", None
        year, month, day, hour, minute, second, frac, zone = match.groups()
        try:
            datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
        except ValueError:
            return "impossible", None
        if hour is None:
            return "ok", Timepoint("-".join(p for p in (year, month, day) if p))
        date = f"{year}-{month}-{day}"
        clock = f"{hour}:{minute or '00'}:{second or '00'}{frac or ''}"
        if zone is None:
            offset = datetime(int(year), int(month), int(day), int(hour), tzinfo=ZoneInfo(self.default_zone))
            utcoffset = offset.utcoffset()
            assert utcoffset is not None
            minutes = int(utcoffset.total_seconds() // 60)
            sign = "+" if minutes >= 0 else "-"
            zone_text = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
            return "zone-assumed", Timepoint(f"{date}T{clock}{zone_text}", zone_assumed=True)
        zone_text = "Z" if zone == "Z" else f"{zone[:3]}:{zone[3:]}"
        return "ok", Timepoint(f"{date}T{clock}{zone_text}")

    def interval(self, element: etree._Element | None) -> tuple[Timepoint | None, Timepoint | None]:
        if element is None:
            return None, None
        if element.get("value"):
            point = self.ts(element)
            return point, None
        kids = self.kids(element)
        return self.ts(_first(kids, _Q_LOW)), self.ts(_first(kids, _Q_HIGH))

    def timing(self, element: etree._Element) -> Timing | None:
        """PIVL_TS (every n units) or EIVL_TS (event-related) with operator A, as a FHIR Timing."""
        kind = (element.get(XSI_TYPE) or "").split(":")[-1]
        if kind == "PIVL_TS":
            period = self.child(element, "period")
            if period is None or period.get("value") is None:
                return None
            value = _decimal(period.get("value"))
            unit = period.get("unit") or "d"
            if value is None:
                return None
            entry = self.mappings.code("time-units").lookup(unit)
            if not isinstance(entry, dict):
                self.note("warning", "code-invalid", f"frequency unit {unit!r} not mapped; kept as text", element)
                return Timing(text=f"toutes les {value.normalize():f} {unit}")
            text = f"1 fois par {entry['one']}" if value == 1 else f"toutes les {value.normalize():f} {entry['many']}"
            return Timing(period=value, period_unit=str(entry["unit"]), frequency=1, text=text)
        if kind == "EIVL_TS":
            event = self.child(element, "event")
            code = event.get("code") if event is not None else None
            return Timing(when=(code,), text=code) if code else None
        return None

    # -- quantities --------------------------------------------------------------------------------
    def dose(self, element: etree._Element | None) -> Dose | None:
        if element is None or element.get("nullFlavor") is not None:
            return None
        value = _decimal(element.get("value"))
        if value is None:
            return None
        unit = element.get("unit")
        text = None
        translation = self.child(element, "translation")
        if translation is not None:
            original = self.child(translation, "originalText")
            text = text_of(original) or None
            if text and unit in (None, "1"):
                text = f"{value.normalize():f} {text}"
        if text is None and unit and unit != "1":
            shown = self.mappings.code("dose-units").lookup(unit)
            if shown != unit:
                text = f"{value.normalize():f} {shown}"
        return Dose(value, unit, text)

    def ratio(self, element: etree._Element | None) -> Ratio | None:
        if element is None:
            return None
        num, den = self.dose(self.child(element, "numerator")), self.dose(self.child(element, "denominator"))
        return Ratio(num, den) if num and den else None

    # -- people and organisations -----------------------------------------------------------------
    def name(self, element: etree._Element | None) -> Name | None:
        if element is None or element.get("nullFlavor") is not None:
            return None
        kids = self.kids(element)
        families = kids.get(_Q_FAMILY, [])
        givens = kids.get(_Q_GIVEN, [])
        if not families and not givens:
            text = text_of(element)
            return Name("usual", text=text) if text else None
        table = self.mappings.code("name-use")
        qualifier = next((f.get("qualifier") for f in families if f.get("qualifier")), None)
        use = table.lookup(qualifier) if qualifier else None
        if use is None and element.get("use"):
            use = table.lookup(element.get("use", "").split()[0])
        family = " ".join(t for t in map(text_of, families) if t) or None
        given = tuple(t for t in map(text_of, givens) if t)
        prefix = tuple(t for t in map(text_of, kids.get(_Q_PREFIX, ())) if t)
        return Name(str(use) if use else "usual", family, given, prefix)

    def names(self, parent: etree._Element | None) -> tuple[Name, ...]:
        if parent is None:
            return ()
        return tuple(n for n in (self.name(e) for e in self.kids(parent).get(_Q_NAME, ())) if n is not None)

    def telecoms(self, parent: etree._Element | None) -> tuple[Telecom, ...]:
        if parent is None:
            return ()
        out: list[Telecom] = []
        for element in self.kids(parent).get(_Q_TELECOM, ()):
            value = (element.get("value") or "").strip()
            if not value or element.get("nullFlavor"):
                continue
            scheme, _, rest = value.partition(":")
            system = _TELECOM_SCHEMES.get(scheme.lower())
            if system is None:
                system, rest = "other", value
            if system == "url":
                rest = value
            use_attr = (element.get("use") or "").split()
            use = self.mappings.code("telecom-use").lookup(use_attr[0]) if use_attr else None
            out.append(Telecom(system, rest.strip(), str(use) if use else None))
        return tuple(out)

    def addresses(self, parent: etree._Element | None) -> tuple[Address, ...]:
        if parent is None:
            return ()
        out: list[Address] = []
        for element in self.kids(parent).get(_Q_ADDR, ()):
            if element.get("nullFlavor"):
                continue
            kids = self.kids(element)
            city = text_of(_first(kids, _Q_CITY)) or None
            postal = text_of(_first(kids, _Q_POSTAL_CODE)) or None
            country = text_of(_first(kids, _Q_COUNTRY)) or None
            # (after the lookups above, which keep the children's proxies: this walk only finds them)
            lines = [t for t in map(text_of, _address_lines(element, kids)) if t]
            if not lines and not city and not postal:
                flat = text_of(element)
                lines = [flat] if flat else []
            if lines or city or postal or country:
                out.append(Address(tuple(lines), city, postal, country))
        return tuple(out)

    def organization(self, element: etree._Element | None) -> Organization | None:
        if element is None:
            return None
        ids = self.idents(element)
        kids = self.kids(element)
        name = text_of(_first(kids, _Q_NAME)) or None
        kind = self.concept(_first(kids, _Q_INDUSTRY))
        if not ids and not name:
            return None
        return Organization(ids, name, kind, self.telecoms(element), self.addresses(element))

    def practitioner(
        self, assigned: etree._Element | None, *, person_tag: str = "assignedPerson"
    ) -> Practitioner | None:
        """An assignedAuthor / assignedEntity / intendedRecipient as a Practitioner (or None)."""
        if assigned is None:
            return None
        kids = self.kids(assigned)
        person = _first(kids, _CLARK[person_tag])
        if person is None:
            person = _first(kids, _Q_INFORMATION_RECIPIENT)
        names = self.names(person)
        org_el = _first(kids, _Q_REPRESENTED_ORGANIZATION)
        if org_el is None:
            org_el = _first(kids, _Q_RECEIVED_ORGANIZATION)
        organization = self.organization(org_el)
        ids = self.idents(assigned)
        if not ids and not names and organization is None:
            return None
        return Practitioner(
            ids,
            names[0] if names else None,
            self.concept(_first(kids, _Q_CODE)),
            self.telecoms(assigned),
            self.addresses(assigned),
            organization,
        )


_TELECOM_SCHEMES = {"tel": "phone", "fax": "fax", "mailto": "email", "http": "url", "https": "url"}
_ADDRESS_LINES = {
    "streetAddressLine",
    "houseNumber",
    "streetName",
    "streetNameBase",
    "additionalLocator",
    "unitID",
    "postBox",
    "careOf",
    "deliveryAddressLine",
}


def _address_lines(element: etree._Element, kids: Mapping[Any, list[etree._Element]]) -> list[etree._Element]:
    """The address-line children of an ``addr`` (any namespace), in document order."""
    tags = [tag for tag in kids if isinstance(tag, str) and tag.rsplit("}", 1)[-1] in _ADDRESS_LINES]
    if not tags:
        return []
    if len(tags) == 1:  # one kind of line (streetAddressLine): already in document order
        return kids[tags[0]]
    return [e for e in element if _local(e) in _ADDRESS_LINES]


def _local(element: etree._Element) -> str:
    tag = element.tag
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _decimal(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(value.strip().replace(",", "."))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _derived_national_ids(ident: Ident) -> tuple[Ident, ...]:
    """idNatPs "8"+RPPS and idNatSt "1"+FINESS also give the bare RPPS / FINESS identifiers."""
    if ident.type_code == "IDNPS" and len(ident.value) == 12 and ident.value.startswith("8"):
        return (Ident("https://rpps.esante.gouv.fr", ident.value[1:], "RPPS", "official"),)
    if ident.type_code == "IDNST" and len(ident.value) == 10 and ident.value.startswith("1"):
        return (Ident("https://finess.esante.gouv.fr", ident.value[1:], None, "official"),)
    return ()


def attr_path(element: Any) -> str:
    """A short XPath-like location for messages: ``/ClinicalDocument/component/...``."""
    tree = element.getroottree()
    return str(tree.getpath(element)).replace("{urn:hl7-org:v3}", "")
