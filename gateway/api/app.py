"""``create_app``: the gateway's HTTP API.

Today it serves what the consent/separation stage needs to be edited in place — FHIR ``Consent``
(with the legal representatives as ``RelatedPerson``) and the directory (Organization, Practitioner,
PractitionerRole, Endpoint) — versioned, with ``_history``; the delivery issue adds ``POST /letters``
and ``$process-message``.  Callers authenticate with an API key (``Authorization: Bearer <key>`` or
``X-API-Key``); a key carries roles, and writing consents or the directory needs ``admin``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.routing import request_response

from gateway import audit, validate
from gateway.api import auth, ops, pages
from gateway.api.limits import BodyLimit
from gateway.api.logins import RefusedLogins
from gateway.api.outcomes import FHIR_JSON, NO_TELEMETRY, ApiError, install
from gateway.auditlog import AuditLog, Filters, Record
from gateway.consent import what_is_missing
from gateway.keys import load_public_keys
from gateway.mappings import Mappings
from gateway.metrics import Metrics
from gateway.outbox import STATES, Delivery, Outbox
from gateway.settings import Settings
from gateway.store import STORED_TYPES, ResourceStore

__all__ = ["CALLER", "api_key", "caller_id", "create_app"]

_PROJECT = "https://fhir.discharge-gateway.fr"

Json = dict[str, Any]

# the FHIR types served by the generic routes, as OpenAPI declares them (so that a client, or a
# fuzzer, does not take /deliveries for a search of type "deliveries"); others get a 404 outcome
ResourceType = Annotated[
    str, Path(description="a stored FHIR resource type", json_schema_extra={"enum": list(STORED_TYPES)})
]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


ACCEPTED = {
    "application/hl7-cda+xml",
    "application/xml",
    "text/xml",
    "application/fhir+json",
    "application/json",
}


def create_app(
    settings: Settings,
    store: ResourceStore,
    outbox: Outbox | None = None,
    mappings: Mappings | None = None,
    on_accepted: Callable[[str, Any], None] | None = None,
) -> FastAPI:
    """The gateway's HTTP API; ``on_accepted(letter_id, prepared)`` tells an in-process delivery worker
    about a new letter (it reuses the translation and starts at once)."""
    app = FastAPI(
        title="Discharge gateway",
        version="0.1.0",
        description="FHIR R4 gateway for hospital discharge letters — consents and directory",
        telemetry=NO_TELEMETRY,
    )
    install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_document_bytes)  # before the body is read
    keys = settings.api_keys
    audit_log = outbox.log if outbox is not None else AuditLog(store.engine, reader=store.reader)
    metrics = outbox.metrics if outbox is not None else Metrics()
    logins = RefusedLogins(audit_log, metrics)  # every 401, audited (coalesced) and counted
    app.router.on_shutdown.append(logins.flush)

    def forbidden(request: Request, needed: str) -> None:
        now = datetime.now(UTC)
        event = audit.rest_event(
            "operation",
            f"{request.method} {request.url.path}",
            caller_id(request),
            now.isoformat(timespec="seconds"),
            outcome="4",
            text=f"refused: {request.method} {request.url.path} needs the role {needed}",
        )
        audit_log.record([event], now)

    def role(*allowed: str) -> Callable[[Request], Awaitable[frozenset[str]]]:
        """A dependency: the caller's roles, if one of ``allowed``; else a 401 or 403, audited.  A coroutine
        on the event loop (authentication is a dictionary look-up; a sync dependency would cost a thread
        hand-off per request): only a refusal's audit write is handed to a thread."""
        wanted = frozenset(allowed)
        needed = " or ".join(allowed)

        async def check(request: Request) -> frozenset[str]:
            # an API key and/or a client certificate (mutual TLS), as auth.install(app, ClientAuth(...)) says
            key = api_key(request)
            try:
                roles = auth.authenticate(request, key, keys)
            except auth.Unauthenticated as refused:
                await run_in_threadpool(logins.refused, request, refused.reason, refused.message, key)
                raise
            if not roles & wanted:
                await run_in_threadpool(forbidden, request, needed)
                raise ApiError(403, "forbidden", f"this operation needs the role {needed}")
            return roles

        return check

    reader = Depends(role("admin", "auditor"))
    writer = Depends(role("admin"))
    status_reader = Depends(role("his", "admin", "auditor"))

    async def client_of(request: Request) -> str:
        """:func:`caller_id`, as a dependency that runs on the event loop (no thread hand-off)."""
        return caller_id(request)

    if outbox is not None and mappings is not None:
        _letters(app, settings, store, outbox, mappings, status_reader, client_of, role, on_accepted)
    auditor = Depends(role("auditor", "admin"))
    _audit_api(app, audit_log, auditor, client_of)
    trust = [audit_log.signer.key] if audit_log.signer is not None else []  # checks the checkpoints it signs
    pages.install(
        app, log=audit_log, outbox=outbox, auditor=auditor, client_of=caller_id, keys=keys, trust=trust, logins=logins
    )

    def changed(request: Request, interaction: str, stored: Json) -> Callable[[Any], None]:
        """Audit a consent or directory change in the transaction that stores it."""
        ref = f"{stored['resourceType']}/{stored['id']}/_history/{stored['meta']['versionId']}"
        recorded = datetime.now(UTC)
        event = audit.rest_event(interaction, ref, caller_id(request), recorded.isoformat(timespec="seconds"))
        return lambda conn: audit_log.append(conn, [event], recorded)

    # /healthz, /readyz, /metrics and the request log line (before the /{resource_type} routes)
    earlier = (
        load_public_keys(settings.trusted_keys_file.read_bytes(), str(settings.trusted_keys_file))
        if (settings.trusted_keys_file)
        else []
    )
    ops.install(
        app, engine=store.engine, metrics=metrics, mappings=mappings, signer=audit_log.signer, earlier_keys=earlier
    )

    def _type(resource_type: str) -> str:
        if resource_type not in STORED_TYPES:
            raise ApiError(404, "not-supported", f"no {resource_type} endpoint here; types: {', '.join(STORED_TYPES)}")
        return resource_type

    async def _body(request: Request, resource_type: str, rid: str | None) -> Json:
        raw = await request.body()
        if len(raw) > settings.max_document_bytes:
            raise ApiError(413, "too-long", "request body over the size limit")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "structure", f"malformed JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("resourceType") != resource_type:
            raise ApiError(400, "invalid", f"the body must be a {resource_type} resource")
        if rid is not None and body.get("id") not in (None, rid):
            raise ApiError(400, "invalid", f"resource id {body.get('id')!r} does not match the URL id {rid!r}")
        body = {k: v for k, v in body.items() if k != "meta"} | (
            {"meta": {k: v for k, v in body["meta"].items() if k not in ("versionId", "lastUpdated")}}
            if isinstance(body.get("meta"), dict) and set(body["meta"]) - {"versionId", "lastUpdated"}
            else {}
        )
        candidate = {**body, "id": rid or body.get("id") or "candidate"}
        problems = validate.check_with_models(candidate) or validate.problems(candidate, fhir_json=True)
        if problems:
            raise ApiError(422, "invariant", f"not a valid FHIR R4 {resource_type}: {problems[0]}")
        missing = what_is_missing(body)
        if missing is not None:
            raise ApiError(422, *missing)
        return body

    @app.post("/{resource_type}", status_code=201)
    async def create(resource_type: ResourceType, request: Request, _: frozenset[str] = writer) -> Response:
        body = await _body(request, _type(resource_type), None)
        if body.get("id") and store.read(resource_type, str(body["id"])) is not None:
            raise ApiError(409, "duplicate", f"{resource_type}/{body['id']} exists: update it with PUT")
        stored = store.create(resource_type, body, audit=lambda conn, v: changed(request, "create", v)(conn))
        location = f"{resource_type}/{stored['id']}/_history/{stored['meta']['versionId']}"
        return _json(stored, 201, {"Location": location, "ETag": f'W/"{stored["meta"]["versionId"]}"'})

    @app.put("/{resource_type}/{rid}")
    async def update(resource_type: ResourceType, rid: str, request: Request, _: frozenset[str] = writer) -> Response:
        body = await _body(request, _type(resource_type), rid)
        existed = store.read(resource_type, rid) is not None
        interaction = "update" if existed else "create"
        stored = store.put(resource_type, rid, body, audit=lambda conn, v: changed(request, interaction, v)(conn))
        return _json(stored, 200 if existed else 201, {"ETag": f'W/"{stored["meta"]["versionId"]}"'})

    @app.get("/{resource_type}/{rid}")
    def read(resource_type: ResourceType, rid: str, _: frozenset[str] = reader) -> Response:
        found = store.read(_type(resource_type), rid)
        if found is None:
            raise ApiError(404, "not-found", f"{resource_type}/{rid} not found (or deleted)")
        return _json(found, headers={"ETag": f'W/"{found["meta"]["versionId"]}"'})

    @app.delete("/{resource_type}/{rid}", status_code=204)
    def delete(resource_type: ResourceType, rid: str, request: Request, _: frozenset[str] = writer) -> Response:
        def audited(conn: Any, version: Json) -> None:
            changed(request, "delete", version)(conn)

        if not store.delete(_type(resource_type), rid, audit=audited):
            raise ApiError(404, "not-found", f"{resource_type}/{rid} not found")
        return Response(status_code=204)

    @app.get("/{resource_type}/{rid}/_history")
    def history(resource_type: ResourceType, rid: str, _: frozenset[str] = reader) -> Response:
        versions = store.history(_type(resource_type), rid)
        if not versions:
            raise ApiError(404, "not-found", f"{resource_type}/{rid} not found")
        entries = []
        for version, updated, deleted, body in reversed(versions):
            entry: Json = {
                "request": {"method": "DELETE" if deleted else "PUT", "url": f"{resource_type}/{rid}"},
                "response": {
                    "status": "204" if deleted else "200",
                    "etag": f'W/"{version}"',
                    "lastModified": updated.isoformat(),
                },
            }
            if not deleted:
                entry["fullUrl"] = f"{resource_type}/{rid}"
                entry["resource"] = body
            entries.append(entry)
        return _json({"resourceType": "Bundle", "type": "history", "total": len(entries), "entry": entries})

    @app.get("/{resource_type}/{rid}/_history/{version}")
    def vread(resource_type: ResourceType, rid: str, version: int, _: frozenset[str] = reader) -> Response:
        found = store.vread(_type(resource_type), rid, version)
        if found is None:
            raise ApiError(404, "not-found", f"{resource_type}/{rid} version {version} not found")
        return _json(found)

    @app.get("/{resource_type}")
    def search(
        resource_type: ResourceType,
        _: frozenset[str] = reader,
        patient: str | None = None,
        identifier: str | None = None,
    ) -> Response:
        found = store.current(_type(resource_type))
        if patient:
            system, _sep, value = patient.rpartition("|")
            found = [r for r in found if _matches((r.get("patient") or {}).get("identifier"), system, value)]
        if identifier:
            system, _sep, value = identifier.rpartition("|")
            found = [r for r in found if any(_matches(i, system, value) for i in r.get("identifier", []))]
        return _json(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(found),
                "entry": [
                    {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                    for r in found
                ],
            }
        )

    return app


def _letters(
    app: FastAPI,
    settings: Settings,
    store: ResourceStore,
    outbox: Outbox,
    mappings: Mappings,
    status_reader: Any,
    client_of: Callable[[Request], Awaitable[str]],
    role: Callable[..., Callable[[Request], Awaitable[frozenset[str]]]],
    on_accepted: Callable[[str, Any], None] | None,
) -> None:
    """Letters in (``POST /letters``, ``POST /$process-message``), their status, and the operators'
    view of deliveries (dead letters, replay).  A letter is accepted only once stored with its
    deliveries and audit.

    The two letter routes check the caller in their body, not as FastAPI dependencies (the same checks,
    in the same order), and are served without FastAPI's request handler: its dependency solving cost
    more per letter than everything else around the translation."""
    from gateway import audit
    from gateway.errors import GatewayError
    from gateway.ingest.json import parse_json
    from gateway.intake import Intake

    intake = Intake(settings, store, outbox, mappings, on_accepted)  # the same path as the MLLP listener
    refuse = intake.refuse

    def accept(raw: bytes, media_type: str, client: str, now: datetime) -> Response:
        """Translate, route and store in one transaction; 202 (new) or 200 (the same letter again)."""
        if len(raw) > settings.max_document_bytes:
            raise ApiError(413, "too-long", f"letter over the {settings.max_document_bytes}-byte limit")
        accepted = intake.accept(raw, media_type, client, now)
        letter_id = accepted.letter_id
        body = {
            "letterId": letter_id,
            "status": f"/letters/{letter_id}",
            "duplicate": not accepted.created,
            "recipients": accepted.recipients,
            "routingExceptions": list(accepted.routing_exceptions),
        }
        return _json(body, 202 if accepted.created else 200, {"Location": f"/letters/{letter_id}"})

    pushing, status_reading = role("his", "admin"), role("his", "admin", "auditor")

    @app.post("/letters", status_code=202)
    async def push_letter(request: Request) -> Response:
        await pushing(request)
        client = caller_id(request)
        now = datetime.now(UTC)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if media_type not in ACCEPTED:
                raise ApiError(
                    415, "not-supported", f"content type {media_type or '(none)'!r}: send CDA XML or FHIR JSON"
                )
            raw = await request.body()
            # translation and the durable commit run off the event loop: other requests proceed meanwhile
            return await run_in_threadpool(accept, raw, media_type, client, now)
        except GatewayError as error:
            refuse(error, client, now)
            raise

    @app.post("/$process-message")
    async def process_message(request: Request) -> Response:
        """FHIR messaging in: a response message acknowledging one of ours (asynchronous receivers), or a
        message whose focus is a FHIR document Bundle (a letter, handled exactly like ``POST /letters``)."""
        roles = await status_reading(request)
        client = caller_id(request)
        now = datetime.now(UTC)
        try:
            raw = await request.body()
            if len(raw) > settings.max_document_bytes:
                raise ApiError(413, "too-long", f"message over the {settings.max_document_bytes}-byte limit")
            message = parse_json(raw, "message")
            header = _message_header(message)
            response = header.get("response")
            if isinstance(response, dict):
                return acknowledge(header, response, client, now)
            if not roles & {"his", "admin"}:
                raise ApiError(403, "forbidden", "pushing a letter needs the role his or admin")
            document = _focused_document(message, header)
            return await run_in_threadpool(accept, orjson.dumps(document), "application/fhir+json", client, now)
        except GatewayError as error:
            refuse(error, client, now)
            raise

    # both take the Request only and answer a Response: Starlette's plain wrapper serves them as FastAPI's
    # would (the same exception handlers), without FastAPI's per-request dependency machinery
    for route in app.routes:
        if isinstance(route, APIRoute) and route.endpoint in (push_letter, process_message):
            route.app = request_response(route.endpoint)

    def acknowledge(header: Json, response: Json, client: str, now: datetime) -> Response:
        answered = response.get("identifier")
        code = response.get("code")
        if not isinstance(answered, str) or code not in ("ok", "transient-error", "fatal-error"):
            raise ApiError(
                422, "invalid", "MessageHeader.response needs an identifier and a code ok|transient-error|fatal-error"
            )
        if code == "transient-error":
            return _json(
                _outcome(
                    "information", "informational", f"{answered}: transient error noted; the receiver will answer again"
                )
            )
        ok = code == "ok"
        # audited like an MSSanté MDN: one kind of record for every acknowledgement after the hand-over
        event = audit.acknowledgement_event(
            answered, ok, f"receiver answered {code}", client, now.isoformat(timespec="seconds")
        )
        if not outbox.acknowledge(answered, ok, now, detail=f"receiver answered {code}", audit_events=[event]):
            raise ApiError(409, "conflict", f"no message {answered} awaiting an acknowledgement")
        return _json(
            _outcome("information", "informational", f"{answered}: {'acknowledged' if ok else 'dead-lettered'}")
        )

    @app.get("/deliveries")
    def deliveries(
        request: Request,
        status: str | None = None,
        count: Annotated[str | None, Query(alias="_count", description="deliveries per page, 1 to 1000")] = None,
        cursor: Annotated[str | None, Query(alias="_cursor", description="from the Link header")] = None,
        roles: frozenset[str] = Depends(role("admin", "auditor")),
    ) -> Response:
        """Deliveries by state, e.g. ``?status=dead-lettered`` (what operators must look at), in the order
        they last changed: ``_count`` (≤ 1000, default 100) per page, the next page in the ``Link`` header
        (``rel="next"``, with an opaque ``_cursor``) while there is one."""
        if status is not None and status not in STATES:
            raise ApiError(400, "value", f"status must be one of {', '.join(STATES)}")
        size = _int(count, 100, 1, 1000, "_count")
        found = outbox.deliveries(status, limit=size + 1, after=_after(cursor))
        response = _json([_delivery_json(d) for d in found[:size]])
        if len(found) > size:
            last = found[size - 1]
            url = request.url.remove_query_params(["_cursor", "_count"])
            url = url.include_query_params(_count=size, _cursor=_cursor(last.updated_at, last.message_id))
            response.headers["Link"] = f'<{url}>; rel="next"'
        return response

    @app.post("/deliveries/{message_id}/$replay")
    def replay(
        message_id: str, roles: frozenset[str] = Depends(role("admin")), client: str = Depends(client_of)
    ) -> Response:
        """Put a dead-lettered delivery back in the queue (after the cause was fixed); audited."""
        now = datetime.now(UTC)
        if not outbox.replay(message_id, now):
            raise ApiError(409, "conflict", f"no dead-lettered delivery {message_id}")
        outbox.audit(
            [
                audit.operation_event(
                    f"MessageHeader/{message_id}",
                    f"replay requested by {client}",
                    client,
                    now.isoformat(timespec="seconds"),
                )
            ]
        )
        return _json({"messageHeader": message_id, "status": "queued"})

    @app.get("/letters/{letter_id}")
    def letter_status(
        letter_id: str, roles: frozenset[str] = status_reader, client: str = Depends(client_of)
    ) -> Response:
        found = outbox.letter(letter_id)
        if found is None or (roles == frozenset({"his"}) and found["client"] != client):
            raise ApiError(404, "not-found", f"letter {letter_id} not found")
        found["deliveries"] = [_delivery_json(d) for d in found["deliveries"]]
        return _json(found)


CALLER = "gateway.caller"  # where caller_id keeps its answer in the request's scope


def caller_id(request: Request) -> str:
    """Who is calling (and owns a letter): the API key's hash, or the client certificate's fingerprint
    (:func:`auth.client_id`).  Worked out once per request and kept in its scope: the handler, the
    audit and the request log line (:mod:`gateway.api.ops`) all name the caller."""
    found = request.scope.get(CALLER)
    if not isinstance(found, str):
        found = request.scope[CALLER] = auth.client_id(request, api_key(request))
    return found


def api_key(request: Request) -> str | None:
    """The API key of a call: ``Authorization: Bearer``, ``X-API-Key``, or the audit page's session cookie."""
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return request.headers.get("x-api-key") or request.cookies.get(pages.SESSION_COOKIE) or None


def _audit_api(app: FastAPI, log: AuditLog, auditor: Any, client_of: Callable[[Request], Awaitable[str]]) -> None:
    """``GET /AuditEvent`` (searchset, paged), ``GET /AuditEvent/$export`` (CSV, NDJSON) and
    ``GET /Patient/$audit-report``.  Auditors and admins only; every read is itself audited."""
    from gateway import report

    def read_audited(request: Request, who: str, what: str, patient: str | None = None) -> None:
        now = datetime.now(UTC)
        ident = None
        if patient:
            from gateway.model import Ident

            system, _sep, value = patient.rpartition("|")
            ident = Ident(system, value)
        event = audit.rest_event(
            "search-type", what, who, now.isoformat(timespec="seconds"), query=str(request.url.query), patient=ident
        )
        log.record([event], now)

    def filters(request: Request) -> Filters:
        query = request.query_params
        since, until = _date_range(query.getlist("date"))
        outcome = query.get("outcome")
        if outcome is not None and outcome not in ("0", "4", "8", "12"):
            raise ApiError(400, "value", "outcome is one of 0, 4, 8, 12 (AuditEvent.outcome)")
        return Filters(
            patient=query.get("patient") or None,
            recipient=query.get("recipient") or None,
            letter=query.get("letter") or None,
            outcome=outcome,
            since=since,
            until=until,
            kind=query.get("subtype") or None,
        )

    @app.get("/AuditEvent")
    def search_audit(request: Request, _: frozenset[str] = auditor, client: str = Depends(client_of)) -> Response:
        """Search the audit: ``patient`` (system|value or value), ``recipient`` (directory id or reference),
        ``letter`` (letter id), ``date`` (repeatable, with ge/gt/le/lt/eq prefixes), ``outcome``,
        ``subtype``; ``_count`` (≤ 500) and ``_offset`` page through the results, oldest first."""
        wanted = filters(request)
        count = _int(request.query_params.get("_count"), 50, 1, 500, "_count")
        offset = _int(request.query_params.get("_offset"), 0, 0, 10**9, "_offset")
        total, records = log.search(wanted, offset=offset, count=count)
        read_audited(request, client, "AuditEvent", wanted.patient)
        base = str(request.url.remove_query_params(["_offset", "_count"]))
        sep = "&" if "?" in base else "?"
        links = [{"relation": "self", "url": f"{base}{sep}_count={count}&_offset={offset}"}]
        if offset + count < total:
            links.append({"relation": "next", "url": f"{base}{sep}_count={count}&_offset={offset + count}"})
        if offset > 0:
            links.append({"relation": "previous", "url": f"{base}{sep}_count={count}&_offset={max(0, offset - count)}"})
        return _json(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": total,
                "link": links,
                "entry": [
                    {"fullUrl": f"AuditEvent/{r.id}", "resource": _chained(r), "search": {"mode": "match"}}
                    for r in records
                ],
            }
        )

    @app.get("/AuditEvent/$export")
    def export_audit(request: Request, _: frozenset[str] = auditor, client: str = Depends(client_of)) -> Response:
        """Every matching record for an inspection: ``_format=csv`` (one line per record, with its chain
        hashes) or ``_format=ndjson`` (one AuditEvent per line); the Accept header decides otherwise."""
        wanted = filters(request)
        fmt = request.query_params.get("_format") or (
            "csv" if "text/csv" in request.headers.get("accept", "") else "ndjson"
        )
        if fmt not in ("csv", "ndjson"):
            raise ApiError(400, "value", "_format is csv or ndjson")
        read_audited(request, client, "AuditEvent/$export", wanted.patient)
        records = log.iterate(wanted)
        if fmt == "csv":
            return StreamingResponse(
                _csv_lines(records),
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
            )
        return StreamingResponse(
            (orjson.dumps(_chained(r)) + b"\n" for r in records),
            media_type="application/fhir+ndjson",
            headers={"Content-Disposition": 'attachment; filename="audit.ndjson"'},
        )

    @app.get("/Patient/$audit-report")
    def patient_report(
        request: Request, identifier: str, _: frozenset[str] = auditor, client: str = Depends(client_of)
    ) -> Response:
        """The data-subject access report for one patient (``identifier=system|value``): a FHIR List of
        who received what about them, when, and what was held back (``/audit/patient`` prints it)."""
        if not identifier.strip("|"):
            raise ApiError(400, "required", "identifier=system|value of the patient (INS or IPP)")
        read_audited(request, client, "Patient/$audit-report", identifier)
        found = report.for_patient(log, identifier)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        return _json(report.patient_report_bundle(identifier, found, now))


def _chained(record: Record) -> Json:
    """The AuditEvent as stored, with its place in the chain (so an export can be re-verified)."""
    event = record.event
    event["extension"] = [
        {"url": f"{_PROJECT}/StructureDefinition/audit-chain-seq", "valueInteger": record.seq},
        {"url": f"{_PROJECT}/StructureDefinition/audit-chain-hash", "valueString": record.hash},
        {"url": f"{_PROJECT}/StructureDefinition/audit-chain-previous", "valueString": record.prev_hash},
    ]
    return event


def _csv_lines(records: Any) -> Any:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = (
        "seq",
        "at",
        "id",
        "subtype",
        "outcome",
        "patient",
        "recipient",
        "letter",
        "description",
        "prev_hash",
        "hash",
    )
    writer.writerow(header)
    for r in records:
        desc = str(r.event.get("outcomeDesc", ""))
        writer.writerow(
            (r.seq, r.at, r.id, r.kind, r.outcome, r.patient, r.recipient, r.letter_id, desc, r.prev_hash, r.hash)
        )
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def _int(value: str | None, default: int, low: int, high: int, name: str) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise ApiError(400, "value", f"{name} must be a whole number from {low} to {high}")
    return int(value)


def _cursor(updated_at: datetime, message_id: str) -> str:
    """Where a page of deliveries ended, for the next one (opaque to clients: base64url of JSON)."""
    stamp = updated_at.astimezone(UTC).isoformat()
    return base64.urlsafe_b64encode(orjson.dumps([stamp, message_id])).decode("ascii").rstrip("=")


def _after(cursor: str | None) -> tuple[datetime, str] | None:
    """The ``(updated_at, message_id)`` a ``_cursor`` names; a cursor this service did not write is a 400."""
    if not cursor:
        return None
    try:
        stamp, message_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        moment = datetime.fromisoformat(stamp)
        if not isinstance(message_id, str) or moment.tzinfo is None:
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ApiError(400, "value", "_cursor is not one this service gave (take it from the Link header)") from None
    return moment.astimezone(UTC), message_id


def _date_range(values: list[str]) -> tuple[str | None, str | None]:
    """FHIR ``date`` search values (ge/gt/le/lt/eq prefixes, date or dateTime precision; no zone = UTC)
    as a half-open range of UTC stamps, the form the audit log stores."""
    since: str | None = None
    until: str | None = None
    for raw in values:
        prefix, value = (raw[:2], raw[2:]) if raw[:2] in ("ge", "gt", "le", "lt", "eq") else ("eq", raw)
        start, end = _bounds(value)
        if prefix in ("ge", "eq"):
            since = max(since or start, start)
        if prefix == "gt":
            since = max(since or end, end)
        if prefix in ("le", "eq"):
            until = min(until or end, end)
        if prefix == "lt":
            until = min(until or start, start)
    return since, until


def _bounds(value: str) -> tuple[str, str]:
    from datetime import date, timedelta

    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start.strftime(fmt), (start + timedelta(days=1)).strftime(fmt)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "value", f"date {value!r}: give YYYY-MM-DD or an ISO 8601 dateTime") from None
    moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    step = timedelta(seconds=1) if moment.microsecond == 0 else timedelta(microseconds=1)
    return moment.strftime(fmt), (moment + step).strftime(fmt)


def _delivery_json(d: Delivery) -> Json:
    return {
        "recipient": d.recipient_id,
        "messageHeader": d.message_id,
        "letter": d.letter_id,
        "endpoint": d.endpoint,
        "status": d.status,
        "attempts": d.attempts,
        "updated": d.updated_at.isoformat(),
        "queued": _iso(d.queued_at),
        "sent": _iso(d.sent_at),
        "acknowledged": _iso(d.acknowledged_at),
        "nextAttempt": d.due_at.isoformat() if d.status == "failed-retrying" else None,
        "lastError": d.last_error,
        "replaces": d.replaces,
        "kind": d.kind,
    }


def _outcome(severity: str, code: str, text: str) -> Json:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def _message_header(message: Any) -> Json:
    entries = message.get("entry") if isinstance(message, dict) else None
    if not isinstance(message, dict) or message.get("resourceType") != "Bundle" or message.get("type") != "message":
        raise ApiError(400, "invalid", "the body must be a FHIR message Bundle (type message)")
    header = (
        entries[0].get("resource") if isinstance(entries, list) and entries and isinstance(entries[0], dict) else None
    )
    if not isinstance(header, dict) or header.get("resourceType") != "MessageHeader":
        raise ApiError(400, "invalid", "a message Bundle starts with its MessageHeader")
    return header


def _focused_document(message: Json, header: Json) -> Json:
    """The FHIR document Bundle the message is about (its focus, or the only document inside)."""
    focus = {f.get("reference") for f in header.get("focus", []) if isinstance(f, dict)}
    documents = [
        e["resource"]
        for e in message["entry"][1:]
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "Bundle"
        and e["resource"].get("type") == "document"
        and (not focus or e.get("fullUrl") in focus or f"Bundle/{e['resource'].get('id')}" in focus)
    ]
    if len(documents) != 1:
        raise ApiError(
            422,
            "not-supported",
            "the message must carry exactly one FHIR document Bundle (its focus), or be a response message",
        )
    return dict(documents[0])


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _matches(identifier: Any, system: str, value: str) -> bool:
    return (
        isinstance(identifier, dict)
        and identifier.get("value") == value
        and (not system or identifier.get("system") == system)
    )
