"""Operator imports: the actor directory and the consents, from files, into the gateway's store.

``gateway directory import FILE`` takes a FHIR Bundle (``collection``, ``transaction``, ``batch`` or
``searchset``) of Organization / Practitioner / PractitionerRole / Endpoint, or a CSV (below).
``gateway consents import FILE`` takes a Bundle or NDJSON of Consent and RelatedPerson (legal
representatives); several entries with the same Consent id are its versions, oldest first.

What an operator can rely on, and why:

- **Validation first.**  Every resource is checked (the fhir.resources R4B models and the project's
  FHIR JSON rules, as ``PUT`` does; for a Consent, what the decision stage needs; for the directory,
  that references resolve, that an endpoint has a transport and that a published certificate is
  one) before anything is written.  Each refused entry is reported with its line (CSV, NDJSON) or
  entry number (Bundle) and the reason.
- **All or nothing.**  One refused entry refuses the file; otherwise every write and its AuditEvent go
  in one transaction — a half-imported directory would route letters to half the actors.
- **Idempotent.**  An entry equal to what is stored (ignoring ``meta.versionId`` / ``lastUpdated``) is
  counted *unchanged* and not written again: re-importing the same file adds no version.
- **Audited as through the API.**  Each write is a ``rest`` AuditEvent (create / update of
  ``Type/id/_history/version``) chained in the same transaction, by ``cli:<user>``.
- **Consent history keeps its time.**  A Consent version carrying ``meta.lastUpdated`` is stored as
  valid from then (so decisions taken at a past instant are explained by the version valid then),
  provided that is not in the future and not before a version already stored: history is append-only.
  Directory resources and RelatedPerson are stored as of now, as the API does.

CSV columns (directory; a header row names them, in any order; UTF-8, ``,`` or ``;`` separated; one
row per resource; a cell of a column that does not apply to the row's ``kind`` must be empty):

==============  ====================================  =====================================================
column          kinds                                 meaning
==============  ====================================  =====================================================
kind            all (required)                        ``Organization``, ``Practitioner``, ``PractitionerRole``
                                                      or ``Endpoint``
id              all (required)                        the resource id (``[A-Za-z0-9.-]{1,64}``), stable
                                                      across imports
active          all                                   ``true`` (default) or ``false``; an Endpoint that is
                                                      not active gets ``status = off``
name            Organization, Endpoint                the name
family          Practitioner (required)               family name
given           Practitioner                          given names, space-separated
prefix          Practitioner                          ``Dr``, ``Pr``, ``Mme``...
rpps            Practitioner                          11-digit RPPS (also stored as idNatPs ``8`` + RPPS)
finess          Organization                          9-character FINESS (also stored as idNatSt ``1`` +
                                                      FINESS)
type            Organization                          category (TRE-R66 CategorieEtablissement code, e.g.
                                                      ``460`` SAAD), or ``system|code``
profession      PractitionerRole                      profession (TRE-G15 ProfessionSante code: ``10``
                                                      médecin, ``21`` pharmacien, ``60`` infirmier...), or
                                                      ``system|code``
specialty       PractitionerRole                      specialty (TRE-R38 SpecialiteOrdinale code, e.g.
                                                      ``SM54`` médecine générale), or ``system|code``
practitioner    PractitionerRole                      the Practitioner's id
organization    PractitionerRole, Endpoint            the Organization's id (of the role; managing the
                                                      endpoint)
endpoint        Organization, PractitionerRole        the Endpoint's id where it receives
address         Endpoint (required)                   ``https://…`` (FHIR ``$process-message``) or
                                                      ``mailto:…`` (MSSanté)
connection      Endpoint                              endpoint-connection-type code; default
                                                      ``hl7-fhir-msg`` for http(s), ``direct-project`` for
                                                      mailto
certificate     Endpoint                              the recipient's encryption certificate, base64 DER
                                                      (PEM armour accepted)
phone           Organization, Practitioner            work phone number
==============  ====================================  =====================================================

Which kind of recipient a role or organisation is (and so what it may receive) follows from
``profession`` / ``specialty`` / ``type`` through ``mappings/policy.yaml``; a recipient the policy
gives no kind, or without an active endpoint, is imported with a warning.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import select

from gateway import audit, validate
from gateway.auditlog import AuditLog, head_table
from gateway.consent import what_is_missing
from gateway.directory import ENDPOINT_CERTIFICATE, FINESS, IDNPS, IDNST, RPPS, Directory
from gateway.errors import IngestError, Where
from gateway.policy import Policy
from gateway.store import DIRECTORY_TYPES, ResourceStore

__all__ = [
    "CONSENT_TYPES",
    "CSV_COLUMNS",
    "Item",
    "Plan",
    "Refusal",
    "apply",
    "plan",
    "read_bundle",
    "read_csv",
    "read_ndjson",
]

Json = dict[str, Any]
CONSENT_TYPES = ("Consent", "RelatedPerson")
BUNDLE_TYPES = ("collection", "transaction", "batch", "searchset")
PROFESSION = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
SPECIALTY = "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"
CATEGORY = "https://mos.esante.gouv.fr/NOS/TRE_R66-CategorieEtablissement/FHIR/TRE-R66-CategorieEtablissement"
CONNECTION = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PAYLOAD = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
TRANSPORT_SCHEMES = ("https", "http", "mailto")
CSV_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "kind": DIRECTORY_TYPES,
    "id": DIRECTORY_TYPES,
    "active": DIRECTORY_TYPES,
    "name": ("Organization", "Endpoint"),
    "family": ("Practitioner",),
    "given": ("Practitioner",),
    "prefix": ("Practitioner",),
    "rpps": ("Practitioner",),
    "finess": ("Organization",),
    "type": ("Organization",),
    "profession": ("PractitionerRole",),
    "specialty": ("PractitionerRole",),
    "practitioner": ("PractitionerRole",),
    "organization": ("PractitionerRole", "Endpoint"),
    "endpoint": ("Organization", "PractitionerRole"),
    "address": ("Endpoint",),
    "connection": ("Endpoint",),
    "certificate": ("Endpoint",),
    "phone": ("Organization", "Practitioner"),
}
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RPPS = re.compile(r"\d{11}")
_FINESS = re.compile(r"\d[\dAB]\d{7}")
_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Item:
    """One resource (one version, for a Consent) read from the file."""

    where: str  # "directory.csv:12", "consents.json entry 3"
    resource_type: str
    id: str
    body: Json  # as it will be stored, without meta.versionId / meta.lastUpdated
    at: datetime | None = None  # the version's time kept from the file (Consent meta.lastUpdated)

    @property
    def ref(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass(frozen=True, slots=True)
class Refusal:
    where: str
    what: str  # "Organization/x", or "" when the entry has no identity yet
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what + ': ' if self.what else ''}{self.reason}"


@dataclass(slots=True)
class Plan:
    """What an import would do: every entry is written, unchanged or refused."""

    source: str
    items: list[Item] = field(default_factory=list)
    writes: list[tuple[Item, str]] = field(default_factory=list)  # (item, "create" | "update")
    unchanged: list[Item] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    refused_types: list[str] = field(default_factory=list)  # resource type of each refusal ("" unknown)
    warnings: list[str] = field(default_factory=list)

    def refuse(self, where: str, what: str, reason: str) -> None:
        self.refused.append(Refusal(where, what, reason))
        self.refused_types.append(what.split("/")[0] if what else "")

    def counts(self) -> dict[str, dict[str, int]]:
        """Per resource type: created / updated / unchanged / refused."""
        table: dict[str, dict[str, int]] = {}

        def add(resource_type: str, column: str) -> None:
            row = table.setdefault(
                resource_type or "(unknown)", dict.fromkeys(("created", "updated", "unchanged", "refused"), 0)
            )
            row[column] += 1

        for item, interaction in self.writes:
            add(item.resource_type, "created" if interaction == "create" else "updated")
        for item in self.unchanged:
            add(item.resource_type, "unchanged")
        for resource_type in self.refused_types:
            add(resource_type, "refused")
        return table


# -- reading ---------------------------------------------------------------------------------------------
def _strip_meta(resource: Mapping[str, Any]) -> Json:
    """The resource as stored: server-set meta elements dropped (kept: profile, security, tags)."""
    body = {k: v for k, v in resource.items() if k != "meta"}
    meta = resource.get("meta")
    if isinstance(meta, Mapping):
        kept = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if kept:
            body["meta"] = kept
    return body


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def _item(plan: Plan, where: str, resource: Any, allowed: Sequence[str], *, keep_time: bool) -> Item | None:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        plan.refuse(where, "", "not a FHIR resource (no resourceType)")
        return None
    rtype = str(resource["resourceType"])
    rid = resource.get("id")
    if rtype not in allowed:
        plan.refuse(where, f"{rtype}/{rid or '?'}", f"a {rtype} is not imported here (expected {', '.join(allowed)})")
        return None
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        plan.refuse(
            where, f"{rtype}/{rid or '?'}", "an id ([A-Za-z0-9.-]{1,64}) is required: re-importing must find it again"
        )
        return None
    at = None
    if keep_time and rtype == "Consent":
        stamp = (resource.get("meta") or {}).get("lastUpdated")
        if stamp is not None:
            at = _instant(stamp)
            if at is None:
                plan.refuse(where, f"{rtype}/{rid}", f"meta.lastUpdated {stamp!r} is not an instant with a time zone")
                return None
    return Item(where, rtype, rid, _strip_meta(resource), at)


def read_bundle(raw: bytes, source: str, allowed: Sequence[str], plan: Plan, *, keep_time: bool = False) -> None:
    """Entries of a collection / transaction / batch / searchset Bundle into ``plan.items``."""
    from gateway.ingest.json import parse_json

    bundle = parse_json(raw, source)
    if bundle.get("resourceType") != "Bundle":
        raise IngestError(f"a {bundle.get('resourceType')} is not a Bundle", where=Where(source=source))
    if bundle.get("type") not in BUNDLE_TYPES:
        raise IngestError(
            f"Bundle.type {bundle.get('type')!r}: expected one of {', '.join(BUNDLE_TYPES)}", where=Where(source=source)
        )
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise IngestError("Bundle.entry is not a list", where=Where(source=source))
    aliases: dict[str, str] = {}  # urn:uuid fullUrl -> Type/id, for references inside a transaction
    for number, entry in enumerate(entries, 1):
        where = f"{source} entry {number}"
        if not isinstance(entry, dict):
            plan.refuse(where, "", "not a Bundle entry")
            continue
        if (entry.get("search") or {}).get("mode") == "outcome":
            continue  # a searchset's OperationOutcome
        method = (entry.get("request") or {}).get("method")
        resource = entry.get("resource")
        what = f"{(resource or {}).get('resourceType', '?')}/{(resource or {}).get('id', '?')}"
        if method not in (None, "PUT", "POST"):
            plan.refuse(where, what, f"request.method {method}: only PUT and POST entries are imported")
            continue
        url = str((entry.get("request") or {}).get("url") or "")
        if method == "PUT" and isinstance(resource, dict) and url.split("?")[0] not in ("", what):
            plan.refuse(where, what, f"request.url {url!r} does not name this resource")
            continue
        item = _item(plan, where, resource, allowed, keep_time=keep_time)
        if item is None:
            continue
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url.startswith("urn:"):
            aliases[full_url] = item.ref
        plan.items.append(item)
    if aliases:
        plan.items[:] = [Item(i.where, i.resource_type, i.id, _rewrite(i.body, aliases), i.at) for i in plan.items]


def _rewrite(value: Any, aliases: Mapping[str, str]) -> Any:
    """References to a transaction's ``urn:uuid:`` entries become ``Type/id`` (what the store resolves)."""
    if isinstance(value, dict):
        return {
            k: aliases.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, aliases)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, aliases) for v in value]
    return value


def read_ndjson(raw: bytes, source: str, allowed: Sequence[str], plan: Plan, *, keep_time: bool = False) -> None:
    """One resource per line (blank lines skipped), into ``plan.items``."""
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            resource = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            plan.refuse(where, "", f"malformed JSON: {exc}")
            continue
        item = _item(plan, where, resource, allowed, keep_time=keep_time)
        if item is not None:
            plan.items.append(item)


def read_csv(raw: bytes, source: str, plan: Plan) -> None:
    """Directory rows (columns in the module docstring) as FHIR resources, into ``plan.items``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(f"not UTF-8 (byte {exc.start})", where=Where(source=source)) from None
    first = text.split("\n", 1)[0]
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise IngestError("empty CSV: a header row is expected", where=Where(source=source)) from None
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown or "kind" not in header or "id" not in header or len(set(header)) != len(header):
        problem = (
            f"unknown column(s) {', '.join(map(repr, unknown))}"
            if unknown
            else "duplicate column"
            if len(set(header)) != len(header)
            else "the columns kind and id are required"
        )
        raise IngestError(f"{problem}; columns: {', '.join(CSV_COLUMNS)}", where=Where(source=source, line=1))
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        where = f"{source}:{start}"
        if len(row) != len(header):
            plan.refuse(where, "", f"{len(row)} cells for {len(header)} columns")
            continue
        cells = {h: c.strip() for h, c in zip(header, row, strict=True)}
        try:
            resource = _resource_of(cells)
        except ValueError as exc:
            what = f"{cells['kind']}/{cells['id']}" if cells["kind"] in DIRECTORY_TYPES else ""
            plan.refuse(where, what, str(exc))
            continue
        item = _item(plan, where, resource, DIRECTORY_TYPES, keep_time=False)
        if item is not None:
            plan.items.append(item)


def _coding(value: str, default_system: str) -> Json:
    system, sep, code = value.rpartition("|")
    return {"coding": [{"system": system if sep else default_system, "code": code}]}


def _resource_of(cells: Mapping[str, str]) -> Json:
    """One CSV row as a FHIR resource (ValueError: why the row cannot be one)."""
    kind = cells["kind"]
    if kind not in DIRECTORY_TYPES:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(DIRECTORY_TYPES)}")
    misplaced = [c for c, v in cells.items() if v and kind not in CSV_COLUMNS[c]]
    if misplaced:
        raise ValueError(f"column(s) {', '.join(misplaced)} do not apply to a {kind}")
    active_cell = cells.get("active", "").lower()
    if active_cell not in ("", "true", "false"):
        raise ValueError(f"active {cells['active']!r}: true or false")
    active = active_cell != "false"
    get = cells.get
    res: Json = {"resourceType": kind, "id": cells["id"]}
    phone = [{"system": "phone", "value": get("phone"), "use": "work"}] if get("phone") else []
    if kind == "Organization":
        finess = get("finess") or ""
        if finess and not _FINESS.fullmatch(finess):
            raise ValueError(f"finess {finess!r} is not a 9-character FINESS number")
        if finess:
            res["identifier"] = [{"system": FINESS, "value": finess}, {"system": IDNST, "value": "1" + finess}]
        res["active"] = active
        if get("type"):
            res["type"] = [_coding(str(get("type")), CATEGORY)]
        if not get("name"):
            raise ValueError("an Organization needs a name")
        res["name"] = get("name")
        if phone:
            res["telecom"] = phone
        if get("endpoint"):
            res["endpoint"] = [{"reference": f"Endpoint/{get('endpoint')}"}]
    elif kind == "Practitioner":
        rpps = get("rpps") or ""
        if rpps and not _RPPS.fullmatch(rpps):
            raise ValueError(f"rpps {rpps!r} is not an 11-digit RPPS number")
        if rpps:
            res["identifier"] = [{"system": IDNPS, "value": "8" + rpps}, {"system": RPPS, "value": rpps}]
        res["active"] = active
        if not get("family"):
            raise ValueError("a Practitioner needs a family name")
        name: Json = {"use": "official", "family": get("family")}
        if get("given"):
            name["given"] = str(get("given")).split()
        if get("prefix"):
            name["prefix"] = [get("prefix")]
        res["name"] = [name]
        if phone:
            res["telecom"] = phone
    elif kind == "PractitionerRole":
        res["active"] = active
        if get("practitioner"):
            res["practitioner"] = {"reference": f"Practitioner/{get('practitioner')}"}
        if get("organization"):
            res["organization"] = {"reference": f"Organization/{get('organization')}"}
        if get("profession"):
            res["code"] = [_coding(str(get("profession")), PROFESSION)]
        if get("specialty"):
            res["specialty"] = [_coding(str(get("specialty")), SPECIALTY)]
        if not get("profession") and not get("specialty"):
            raise ValueError("a PractitionerRole needs a profession or a specialty: they decide what it may receive")
        if get("endpoint"):
            res["endpoint"] = [{"reference": f"Endpoint/{get('endpoint')}"}]
    else:  # Endpoint
        address = get("address") or ""
        scheme = address.partition(":")[0].lower()
        if scheme not in TRANSPORT_SCHEMES:
            raise ValueError(f"address {address!r}: https://… or mailto:… expected")
        if get("certificate"):
            armour = re.sub(r"-----(BEGIN|END) CERTIFICATE-----", "", str(get("certificate")))
            res["extension"] = [{"url": ENDPOINT_CERTIFICATE, "valueBase64Binary": "".join(armour.split())}]
        res["status"] = "active" if active else "off"
        default = "direct-project" if scheme == "mailto" else "hl7-fhir-msg"
        res["connectionType"] = {"system": CONNECTION, "code": get("connection") or default}
        if get("name"):
            res["name"] = get("name")
        if get("organization"):
            res["managingOrganization"] = {"reference": f"Organization/{get('organization')}"}
        res["payloadType"] = [{"coding": [{"system": PAYLOAD, "code": "any"}]}]
        res["address"] = address
    return res


# -- checking --------------------------------------------------------------------------------------------
def _references(body: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """(element, reference) of the directory links the router follows."""
    for name in ("practitioner", "organization", "managingOrganization", "partOf"):
        ref = (body.get(name) or {}).get("reference") if isinstance(body.get(name), Mapping) else None
        if isinstance(ref, str):
            yield name, ref
    for ref_obj in body.get("endpoint") or []:
        if isinstance(ref_obj, Mapping) and isinstance(ref_obj.get("reference"), str):
            yield "endpoint", str(ref_obj["reference"])


def _directory_problem(item: Item, known: set[str]) -> str | None:
    for element, ref in _references(item.body):
        if not ref.startswith("#") and "/".join(ref.split("/")[-2:]) not in known:
            return f"{element} {ref!r} is neither in this file nor in the directory"
    if item.resource_type == "Endpoint":
        scheme = str(item.body.get("address", "")).partition(":")[0].lower()
        if item.body.get("status", "active") == "active" and scheme not in TRANSPORT_SCHEMES:
            return f"address {item.body.get('address')!r}: no transport for {scheme or 'it'} (https, http, mailto)"
        for ext in item.body.get("extension") or []:
            if isinstance(ext, Mapping) and ext.get("url") == ENDPOINT_CERTIFICATE:
                return _certificate_problem(str(ext.get("valueBase64Binary", "")))
    return None


def _certificate_problem(value: str) -> str | None:
    from cryptography import x509

    try:
        x509.load_der_x509_certificate(base64.b64decode("".join(value.split()), validate=True))
    except ValueError as exc:
        return f"the endpoint certificate is not an X.509 certificate in base64 DER ({str(exc)[:80]})"
    return None


def _check(item: Item) -> str | None:
    problems = validate.check_with_models(item.body) or validate.problems(item.body, fhir_json=True)
    if problems:
        return f"not a valid FHIR R4 {item.resource_type}: {problems[0]}"
    missing = what_is_missing(item.body)
    return missing[1] if missing else None


# -- planning --------------------------------------------------------------------------------------------
def _same(body: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        _strip_meta(stored), option=orjson.OPT_SORT_KEYS
    )


def plan(
    store: ResourceStore,
    draft: Plan,
    *,
    now: datetime,
    policy: Policy | None = None,
    tick: Callable[[], None] = lambda: None,
) -> Plan:
    """Check every item and decide, against what is stored, which are created, updated or unchanged.

    Several items with one id (a Consent's versions) are matched in order against the stored
    history: versions already there are unchanged, the first one that differs and all after it are
    written.  The last item must equal the *current* version to count as unchanged."""
    types = sorted({i.resource_type for i in draft.items})
    stored: dict[tuple[str, str], list[tuple[datetime, bool, Json]]] = {}
    for resource_type in types:
        for rid, _version, updated, deleted, body in store.all_versions(resource_type):
            when = _instant((body.get("meta") or {}).get("lastUpdated")) or updated.replace(
                tzinfo=updated.tzinfo or UTC
            )
            stored.setdefault((resource_type, rid), []).append((when, deleted, body))
    directory = any(t in DIRECTORY_TYPES for t in types)
    # an entry refused while reading still names its resource: what refers to it is not refused twice
    known: set[str] = {i.ref for i in draft.items} | {r.what for r in draft.refused if r.what}
    if directory:
        known |= {f"{t}/{b['id']}" for t in DIRECTORY_TYPES for b in store.current(t)}
    grouped: dict[tuple[str, str], list[Item]] = {}
    for item in draft.items:
        problem = _check(item) or (_directory_problem(item, known) if item.resource_type in DIRECTORY_TYPES else None)
        if problem is None and item.at is not None and item.at > now + _CLOCK_SKEW:
            problem = f"meta.lastUpdated {item.at.isoformat()} is in the future"
        group = grouped.setdefault((item.resource_type, item.id), [])
        if problem is None and group and item.resource_type != "Consent":
            problem = f"given twice (also {group[0].where}): one entry per {item.resource_type}"
        if problem is not None:
            draft.refuse(item.where, item.ref, problem)
        else:
            group.append(item)
        tick()
    for key, items in grouped.items():
        history = stored.get(key, [])
        live = [(when, body) for when, deleted, body in history if not deleted]
        last_time = max((when for when, _d, _b in history), default=None)
        cursor, writing = 0, False
        for n, item in enumerate(items):
            if not writing:
                if n < len(items) - 1:
                    found = next(
                        (
                            j
                            for j in range(cursor, len(live))
                            if _same(item.body, live[j][1]) and (item.at is None or item.at == live[j][0])
                        ),
                        None,
                    )
                    if found is not None:
                        cursor = found + 1
                        draft.unchanged.append(item)
                        continue
                elif (
                    history
                    and not history[-1][1]
                    and _same(item.body, history[-1][2])
                    and (item.at is None or item.at == history[-1][0])
                ):
                    draft.unchanged.append(item)
                    continue
            if item.at is not None and last_time is not None and item.at < last_time:
                draft.refuse(
                    item.where,
                    item.ref,
                    f"version of {item.at.isoformat()} is older than the version stored or imported before it "
                    f"({last_time.isoformat()}): consent history is append-only",
                )
                break
            draft.writes.append((item, "update" if history or writing else "create"))
            writing, last_time = True, item.at or now
    if directory and policy is not None and not draft.refused:
        _directory_warnings(store, draft, policy)
    return draft


def _directory_warnings(store: ResourceStore, draft: Plan, policy: Policy) -> None:
    """Recipients this import touches that the router could not serve well: no kind, no endpoint."""
    merged: dict[str, Json] = {f"{t}/{b['id']}": b for t in DIRECTORY_TYPES for b in store.current(t)}
    for item, _interaction in draft.writes:
        merged[item.ref] = {**item.body, "resourceType": item.resource_type, "id": item.id}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in merged.values()]}
    touched = {f"{i.resource_type}-{i.id}" for i, _ in draft.writes}
    for recipient in Directory(bundle, policy, draft.source).recipients:
        if recipient.id not in touched:
            continue
        if recipient.kind is None:
            draft.warnings.append(
                f"{recipient.ref}: its codes name no actor kind in policy.yaml: it will receive nothing"
            )
        if recipient.endpoint is None:
            draft.warnings.append(f"{recipient.ref}: no active endpoint: letters for it will be routing exceptions")


# -- writing ---------------------------------------------------------------------------------------------
def apply(
    store: ResourceStore,
    log: AuditLog,
    draft: Plan,
    *,
    who: str,
    now: datetime,
    tick: Callable[[], None] = lambda: None,
) -> tuple[int, int]:
    """Every planned write and its AuditEvent, in one transaction; (first, last) audit seq written."""
    if draft.refused:
        raise ValueError("a plan with refused entries is never applied")
    if not draft.writes:
        return (0, 0)
    recorded = now.isoformat(timespec="seconds")
    events: list[tuple[Json, str | None, str | None]] = []
    with store.engine.begin() as conn:
        store.hold(conn, (item.resource_type for item, _ in draft.writes))
        for item, interaction in draft.writes:
            stored = store.put_in(conn, item.resource_type, item.id, item.body, item.at or now)
            ref = f"{item.ref}/_history/{stored['meta']['versionId']}"
            events.append((audit.rest_event(interaction, ref, who, recorded), None, None))
            tick()
        log.append_many(conn, events, now)
        last = int(conn.execute(select(head_table.c.seq).where(head_table.c.id == 1)).scalar() or 0)
    return (last - len(events) + 1, last)
