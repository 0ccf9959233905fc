"""The actor directory: a FHIR Bundle of Organization / Practitioner / PractitionerRole / Endpoint.

A recipient is a *role* (a person in an organisation, with a profession) or an organisation that
receives as a whole (a SAAD, a CCAS).  Its kind — and so what it may see — comes from the role's
profession codes or the organisation's type, through ``mappings/policy.yaml``; two people of the
same DAC are two recipients of different kinds.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import IngestError, Where
from gateway.policy import Policy

__all__ = ["ENDPOINT_CERTIFICATE", "Directory", "Endpoint", "Recipient", "load_directory"]

Json = dict[str, Any]
RPPS = "https://rpps.esante.gouv.fr"
IDNPS = "urn:oid:1.2.250.1.71.4.2.1"
FINESS = "https://finess.esante.gouv.fr"
IDNST = "urn:oid:1.2.250.1.71.4.2.2"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# the certificate an Endpoint publishes for encryption (DER in valueBase64Binary; see gateway.crypt)
ENDPOINT_CERTIFICATE = "https://fhir.discharge-gateway.fr/StructureDefinition/endpoint-certificate"


@dataclass(frozen=True, slots=True)
class Endpoint:
    ref: str
    address: str
    connection: str  # endpoint-connection-type code: hl7-fhir-msg, direct-project...
    resource: Json = field(repr=False, compare=False, hash=False)
    certificate: bytes | None = field(default=None, repr=False)  # DER, from ENDPOINT_CERTIFICATE


def _certificate(endpoint: Mapping[str, Any]) -> bytes | None:
    """The certificate the Endpoint publishes, if any.  A value that is not base64 is kept as it is: it
    then fails as a certificate when used (a permanent, explained error), it is never silently dropped."""
    for ext in endpoint.get("extension") or []:
        if isinstance(ext, Mapping) and ext.get("url") == ENDPOINT_CERTIFICATE:
            value = "".join(str(ext.get("valueBase64Binary", "")).split())
            try:
                return base64.b64decode(value, validate=True)
            except ValueError:
                return value.encode("utf-8", "replace")
    return None


@dataclass(frozen=True, slots=True)
class Recipient:
    """Someone the gateway can address, as the directory knows them."""

    id: str  # stable and file-name safe: "PractitionerRole-gp-roussel"
    ref: str  # the directory fullUrl
    kind: str | None
    display: str
    resource: Json = field(repr=False, compare=False, hash=False)
    practitioner: Json | None = field(default=None, repr=False, compare=False, hash=False)
    organization: Json | None = field(default=None, repr=False, compare=False, hash=False)
    endpoint: Endpoint | None = None
    identifiers: frozenset[tuple[str, str]] = frozenset()


def _ids(resource: Mapping[str, Any] | None) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for ident in (resource or {}).get("identifier", []):
        system, value = ident.get("system"), ident.get("value")
        if system and value:
            out.add((str(system), str(value)))
            # idNatPs "8"+RPPS and idNatSt "1"+FINESS designate the same actor as the bare number
            if system == IDNPS and str(value).startswith("8"):
                out.add((RPPS, str(value)[1:]))
            if system == IDNST and str(value).startswith("1"):
                out.add((FINESS, str(value)[1:]))
    return out


def _codings(concepts: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [
        (str(c.get("system")), str(c.get("code")))
        for concept in concepts
        for c in concept.get("coding", [])
        if c.get("system") and c.get("code")
    ]


def _name(resource: Mapping[str, Any] | None) -> str:
    if not resource:
        return ""
    if isinstance(resource.get("name"), str):
        return str(resource["name"])
    names = resource.get("name") or [{}]
    first = names[0]
    return str(
        first.get("text")
        or " ".join([*first.get("prefix", []), *first.get("given", []), first.get("family", "")]).strip()
    )


class Directory:
    """Indexes a directory Bundle; lookups by identifier (RPPS, FINESS...), reference or id."""

    def __init__(self, bundle: Mapping[str, Any], policy: Policy, source: str = "directory") -> None:
        if bundle.get("resourceType") != "Bundle":
            raise IngestError("the directory must be a FHIR Bundle", where=Where(source=source))
        self.source = source
        self._by_ref: dict[str, Json] = {}
        for index, entry in enumerate(bundle.get("entry", [])):
            res = entry.get("resource") if isinstance(entry, Mapping) else None
            if not isinstance(res, dict) or not res.get("id"):
                raise IngestError(f"directory entry {index} has no resource id", where=Where(source=source))
            if not isinstance(res["id"], str) or not _FHIR_ID.fullmatch(res["id"]):
                # recipient ids become file names (dispatch --out DIR/<id>.json): FHIR ids only, never a path
                raise IngestError(
                    f"directory entry {index}: {str(res['id'])[:80]!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})",
                    where=Where(source=source),
                )
            kind = res.get("resourceType")
            if kind not in ("Organization", "Practitioner", "PractitionerRole", "Endpoint", "HealthcareService"):
                raise IngestError(
                    f"directory entry {index} is a {kind}, not a directory resource", where=Where(source=source)
                )
            for key in (entry.get("fullUrl"), f"{kind}/{res['id']}"):
                if key:
                    self._by_ref[str(key)] = res
        self.recipients: list[Recipient] = []
        for res in {id(r): r for r in self._by_ref.values()}.values():
            if res["resourceType"] == "PractitionerRole":
                self.recipients.append(self._role(res, policy))
            elif res["resourceType"] == "Organization" and res.get("endpoint"):
                self.recipients.append(self._organization(res, policy))
        self._by_id = {r.id: r for r in self.recipients}

    def resolve(self, ref: Mapping[str, Any] | None) -> Json | None:
        if not ref:
            return None
        target = ref.get("reference")
        if not isinstance(target, str):
            return None
        return self._by_ref.get(target) or self._by_ref.get("/".join(target.split("/")[-2:]))

    def _endpoint(self, refs: Iterable[Mapping[str, Any]]) -> Endpoint | None:
        for ref in refs:
            res = self.resolve(ref)
            if res and res.get("status", "active") == "active" and res.get("address"):
                code = (res.get("connectionType") or {}).get("code", "")
                return Endpoint(str(ref.get("reference")), str(res["address"]), str(code), res, _certificate(res))
        return None

    def _role(self, role: Json, policy: Policy) -> Recipient:
        person = self.resolve(role.get("practitioner"))
        org = self.resolve(role.get("organization"))
        kind = policy.kind_of(_codings([*role.get("code", []), *role.get("specialty", [])]))
        display = " — ".join(p for p in (_name(person), _name(org)) if p) or role["id"]
        endpoint = self._endpoint(role.get("endpoint", [])) or (
            self._endpoint(org.get("endpoint", [])) if org else None
        )
        return Recipient(
            f"PractitionerRole-{role['id']}",
            self._ref_of(role),
            kind,
            display,
            role,
            person,
            org,
            endpoint,
            frozenset(_ids(person) | _ids(role)),
        )

    def _organization(self, org: Json, policy: Policy) -> Recipient:
        kind = policy.kind_of(_codings(org.get("type", [])))
        return Recipient(
            f"Organization-{org['id']}",
            self._ref_of(org),
            kind,
            _name(org) or org["id"],
            org,
            None,
            org,
            self._endpoint(org.get("endpoint", [])),
            frozenset(_ids(org)),
        )

    def _ref_of(self, res: Json) -> str:
        return next(
            (k for k, v in self._by_ref.items() if v is res and "://" in k), f"{res['resourceType']}/{res['id']}"
        )

    def get(self, recipient_id_or_ref: str) -> Recipient | None:
        found = self._by_id.get(recipient_id_or_ref.replace("/", "-"))
        if found:
            return found
        res = self.resolve({"reference": recipient_id_or_ref})
        return next((r for r in self.recipients if r.resource is res), None) if res else None

    def find_person(self, ids: Iterable[tuple[str, str]], org_ids: Iterable[tuple[str, str]] = ()) -> list[Recipient]:
        """Roles of the practitioner with these identifiers; those in the given organisation first."""
        wanted = set(ids)
        roles = [r for r in self.recipients if r.practitioner is not None and r.identifiers & wanted]
        orgs = set(org_ids)
        return sorted(roles, key=lambda r: 0 if orgs & _ids(r.organization) else 1)

    def find_organization(self, ids: Iterable[tuple[str, str]], name: str | None = None) -> Recipient | None:
        wanted = set(ids)
        for r in self.recipients:
            if r.practitioner is None and wanted & r.identifiers:
                return r
        if name and not wanted:
            return next((r for r in self.recipients if r.practitioner is None and r.display == name), None)
        return None


def load_directory(data: Mapping[str, Any], policy: Policy, source: str = "directory") -> Directory:
    return Directory(data, policy, source)
