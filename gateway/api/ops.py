"""Operations endpoints — ``/healthz``, ``/readyz``, ``/metrics`` — and the request log line.

- ``/healthz`` (liveness): the process answers; no dependency is checked, so a database outage never
  gets the gateway restarted in a loop (the outbox keeps the work; it resumes when the database does).
- ``/readyz`` (readiness): the database answers ``SELECT 1`` within ``timeout`` seconds and is at the
  schema revision this code expects, the mappings are loaded, the signing key is present.  200 with
  each check's result, or 503 naming the failing checks.  A check that hangs (a database behind a
  dead network) is waited for ``timeout`` seconds only, and never more than one runs at a time.
- ``/metrics``: Prometheus text format from the outbox's own registry (:mod:`gateway.metrics`).

None of them needs authentication: they are meant for the internal network (load balancer, kubelet,
Prometheus), they carry no patient data and no ids (closed-set labels only), and a probe or scraper
has no API key.  Expose only the API paths to the outside at the reverse proxy.  They are left out of
the OpenAPI document: they are not part of the FHIR API.

The request log line (``gateway.access``) replaces uvicorn's access log, whose line carries the query
string (``/Consent?patient=system|<INS>``): it logs the method, the route *template* (ids and search
parameters never appear; ``letter_id`` and ``message_id`` path parameters become fields), the status,
the duration and the client id (the API key's hash or the certificate's fingerprint).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from joserfc.jwk import ECKey
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import migrate
from gateway.keys import public_jwk
from gateway.logs import bound, get_logger
from gateway.mappings import Mappings
from gateway.metrics import Metrics
from gateway.seal import Signer

__all__ = ["AccessLog", "Readiness", "install", "route_template"]

_access = get_logger("gateway.access")
_PROBES = frozenset({"/healthz", "/readyz", "/metrics", "/.well-known/jwks.json"})
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_PARAMS = {"letter_id": "letter_id", "message_id": "message_id"}


class Readiness:
    """The readiness checks, each answering ``"ok"`` or what is wrong (no secret, no patient data)."""

    def __init__(
        self, engine: Engine | None, mappings: Mappings | None, signer: Signer | None, timeout: float = 2.0
    ) -> None:
        self.engine, self.mappings, self.signer, self.timeout = engine, mappings, signer, timeout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz")
        self._running: Future[tuple[str, str]] | None = None
        self._lock = threading.Lock()

    def checks(self) -> dict[str, str]:
        database, schema = self._database()
        return {
            "database": database,
            "schema": schema,
            "mappings": "ok" if self.mappings is not None and self.mappings.digest else "not loaded",
            "signing_key": "ok" if self.signer is not None else "missing",
        }

    def _database(self) -> tuple[str, str]:
        if self.engine is None:
            return "not configured", "unknown"
        with self._lock:  # one check in flight at most: a hung database does not pile up threads
            if self._running is None or self._running.done():
                self._running = self._pool.submit(_probe, self.engine)
            running = self._running
        try:
            return running.result(timeout=self.timeout)
        except FutureTimeout:
            return f"no answer within {self.timeout:g} s", "unknown"


def _probe(engine: Engine) -> tuple[str, str]:
    """``SELECT 1`` and the schema revision, on one connection; errors by type only (a driver's message
    may name the host, the user or a statement's parameters)."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            # read alembic's table directly: its MigrationContext logs two lines per call (every probe)
            revision = (
                conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                if inspect(conn).has_table("alembic_version")
                else None
            )
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return f"unreachable ({type(cause).__name__})", "unknown"
    expected = migrate.head()
    return "ok", "ok" if revision == expected else f"at {revision or 'no revision'}, expected {expected}"


class AccessLog:
    """One log line per request, with nothing from the URL but the route template (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped to the server error handler

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with bound(request_id=uuid.uuid4().hex[:16]):
            try:
                await self.app(scope, receive, sending)
            finally:
                path = scope.get("path", "")
                _access.log(
                    logging.DEBUG if path in _PROBES and status < 400 else logging.INFO,
                    "request",
                    method=scope.get("method"),
                    route=route_template(scope),
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                    client=_client(scope),
                    **_ids(scope),
                )


def route_template(scope: Scope) -> str:
    """The matched route's template, with the resource type filled in (a closed set); else a marker."""
    template = getattr(scope.get("route"), "path", None)
    if not isinstance(template, str):
        return "(no route)"
    kind = scope.get("path_params", {}).get("resource_type")
    if isinstance(kind, str) and _RESOURCE_TYPE.match(kind):
        template = template.replace("{resource_type}", kind)
    return template


def _ids(scope: Scope) -> dict[str, str]:
    params = scope.get("path_params", {})
    return {field: str(params[name]) for name, field in _ID_PARAMS.items() if name in params}


def _client(scope: Scope) -> str | None:
    """The caller's non-secret id, as the API names it (a request without credentials gets none)."""
    from gateway.api import auth
    from gateway.api.app import CALLER, api_key, caller_id

    known = scope.get(CALLER)  # the handler named the caller already
    if isinstance(known, str):
        return known
    try:
        request = Request(scope)
        if api_key(request) is None and auth.peer_certificate(scope) is None:
            return None
        return caller_id(request)
    except Exception:  # never fail a request for its log line
        return None


def install(
    app: FastAPI,
    *,
    engine: Engine | None,
    metrics: Metrics | None,
    mappings: Mappings | None,
    signer: Signer | None,
    timeout: float = 2.0,
    earlier_keys: Sequence[ECKey] = (),
) -> Readiness:
    """Add the operations endpoints and the request log line to ``app``; ``/.well-known/jwks.json``
    publishes the signing key and ``earlier_keys`` (kept by ``gateway keys rotate``), so a receiver or an
    auditor can check messages and checkpoints signed before a rotation."""
    readiness = Readiness(engine, mappings, signer, timeout)
    published = ([public_jwk(signer.key)] if signer is not None else []) + [public_jwk(k) for k in earlier_keys]
    jwks = {"keys": list({k["kid"]: k for k in reversed(published)}.values())[::-1]}  # current first, no repeat
    counted = metrics or Metrics()
    app.add_middleware(AccessLog)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        checks = readiness.checks()
        failing = [name for name, result in checks.items() if result != "ok"]
        body: dict[str, Any] = {"status": "not ready" if failing else "ready", "checks": checks}
        if failing:
            body["failing"] = failing
        return JSONResponse(body, status_code=503 if failing else 200, headers={"Cache-Control": "no-store"})

    @app.get("/.well-known/jwks.json", include_in_schema=False)
    def public_keys() -> Response:
        return JSONResponse(jwks, media_type="application/jwk-set+json", headers={"Cache-Control": "max-age=300"})

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(counted.exposition()), media_type=CONTENT_TYPE_LATEST)

    return readiness
