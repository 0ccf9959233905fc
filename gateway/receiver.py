"""``gateway receiver``: a reference FHIR messaging recipient (the far end for tests and the demo).

``POST /$process-message`` takes a message Bundle, checks its seal against trusted keys, drops
duplicates by ``MessageHeader.id`` (FHIR R4 reliable messaging: a resent message gets the *original*
response, it is never processed twice), stores it, and answers a response message whose
``MessageHeader.response`` says ``ok``.  A message it cannot accept gets a 4xx OperationOutcome
(the sender must not resend it unchanged).

A receiver that publishes a certificate is given the matching private key(s) (``decryption_keys``): it
then accepts ``application/jose`` (JWE compact) and ``application/jose+json`` bodies, decrypts them and
checks the seal of what is inside as for any message; a JWE it cannot decrypt (altered, or for another
recipient) is refused with 400 ``security``.  ``require_encryption`` refuses messages sent in clear.
Served over HTTPS with client certificates required (mutual TLS), see :func:`tls_server_options`.
"""

from __future__ import annotations

import inspect
import ssl
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from joserfc.jwk import ECKey
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, bindparam, select
from sqlalchemy.engine import Engine
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.auth import StrPath, uvicorn_tls_options
from gateway.api.limits import BodyLimit
from gateway.api.outcomes import FHIR_JSON, NO_TELEMETRY, ApiError, install
from gateway.crypt import JOSE, JOSE_JSON, CryptError, PrivateKey, decrypt
from gateway.dbapi import DriverSQL, bind_for
from gateway.errors import GatewayError
from gateway.package import EVENT
from gateway.seal import SealError, verify
from gateway.store import make_engine

__all__ = ["create_receiver", "tls_server_options"]

Json = dict[str, Any]
_metadata = MetaData()
_received = Table(
    "received_message",
    _metadata,
    Column("message_id", String(64), primary_key=True),
    Column("bundle_id", String(64), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("response", Text, nullable=False),
    Column("body", Text, nullable=False),
)
_INSERT = _received.insert()
_FIRST_RESPONSE = select(_received.c.response).where(_received.c.message_id == bindparam("message_id"))


class _Messages:
    """The INSERT and the resend lookup on a pooled DBAPI connection, compiled once.

    SQLAlchemy's per-call Connection, transaction and result objects cost more CPU than SQLite's own
    insert and commit.  The pool stays: its checkout and checkin hold the SQLite writer's lock file
    (:func:`gateway.store.make_engine`), and a checked-in connection is rolled back as before.
    """

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self._engine = engine
        self._insert = DriverSQL(_INSERT, dialect)
        self._first = DriverSQL(_FIRST_RESPONSE, dialect)
        self._stamp = bind_for(_received.c.received_at, dialect)
        self._duplicate: type[Exception] = dialect.loaded_dbapi.IntegrityError

    def store(self, values: dict[str, Any]) -> str | None:
        """Insert and commit ``values``; for a message already stored (the primary key refuses it, even a
        concurrent resend) nothing is written and its first response is returned."""
        values["received_at"] = self._stamp(values["received_at"])
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self._insert.sql, self._insert.params(values))
                connection.commit()
                return None
            except self._duplicate:
                connection.rollback()
                cursor.execute(self._first.sql, self._first.params(values))
                [[first]] = cursor.fetchall()
                return str(first)
        finally:
            connection.close()


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON)


def _response_message(request_header: Json, endpoint: str, now: datetime) -> Json:
    header = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": request_header.get("eventCoding", EVENT),
        "source": {"name": "reference-receiver", "endpoint": endpoint},
        "response": {"identifier": request_header["id"], "code": "ok"},
    }
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "timestamp": now.isoformat(timespec="seconds"),
        "entry": [{"fullUrl": f"urn:uuid:{header['id']}", "resource": header}],
    }


class _Shortcut:
    """ASGI middleware: a request for ``routes`` goes straight to their ``endpoint``.

    FastAPI's router, dependency solving and exception middleware around a route were a tenth of a
    message's CPU.  The routes stay declared (``/openapi.json``, ``/docs``, 405 for another method);
    a :class:`GatewayError` gets what the app's handler answers, as the exception middleware did, and
    anything else goes up to the app's 500 handler (:func:`gateway.api.outcomes.install`) as before.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: list[APIRoute],
        endpoint: Callable[[Request], Awaitable[Response]],
        refuse: Callable[[Request, Exception], Response | Awaitable[Response]],
    ) -> None:
        self.app, self.routes, self.endpoint, self.refuse = app, routes, endpoint, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(r.matches(scope)[0] is Match.FULL for r in self.routes):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.endpoint(request)
        except GatewayError as error:
            refusal = self.refuse(request, error)
            response = await refusal if inspect.isawaitable(refusal) else refusal
        await response(scope, receive, send)


def tls_server_options(cert_file: StrPath, key_file: StrPath | None, ca_file: StrPath) -> dict[str, Any]:
    """``uvicorn.run(create_receiver(...), host=..., port=..., **tls_server_options(cert, key, ca))``: HTTPS,
    and a client certificate signed by ``ca_file`` is required to connect (mutual TLS)."""
    return uvicorn_tls_options(cert_file, key_file, ca_file, ssl.CERT_REQUIRED)


def create_receiver(
    database_url: str,
    trusted_keys: Iterable[ECKey],
    *,
    endpoint: str = "http://127.0.0.1/fhir",
    decryption_keys: Iterable[PrivateKey] = (),
    require_encryption: bool = False,
    max_bytes: int = 32 * 1024 * 1024,
) -> FastAPI:
    """The receiver app; ``trusted_keys`` empty means signatures are not checked (tests of other parts only).
    A message over ``max_bytes`` is refused 413 before it is read (a sealed letter is well under it)."""
    engine = make_engine(database_url)  # WAL on SQLite: one fsync per message
    _metadata.create_all(engine)
    received = _Messages(engine)
    keys = list(trusted_keys)
    private = list(decryption_keys)
    app = FastAPI(title="Reference FHIR messaging receiver", version="0.1.0", telemetry=NO_TELEMETRY)
    install(app)

    @app.post("/$process-message")
    @app.post("/{mailbox:path}/$process-message")  # one receiver may serve several recipients' endpoints
    async def process_message(request: Request) -> Response:
        body = await request.body()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type in (JOSE, JOSE_JSON):
            if not private:
                raise ApiError(400, "security", "this receiver publishes no certificate: it cannot decrypt a JWE")
            try:
                body = decrypt(body, private, media_type)
            except CryptError as exc:
                raise ApiError(400, "security", exc.message) from None
        elif require_encryption:
            raise ApiError(400, "security", f"this receiver accepts only encrypted messages ({JOSE})")
        try:
            bundle = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "structure", f"malformed JSON: {exc}") from None
        entries = bundle.get("entry") if isinstance(bundle, dict) else None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "message":
            raise ApiError(400, "invalid", "the body must be a FHIR message Bundle (type message)")
        header = entries[0].get("resource") if entries else None
        if not isinstance(header, dict) or header.get("resourceType") != "MessageHeader" or not header.get("id"):
            raise ApiError(400, "invalid", "a message Bundle starts with a MessageHeader that has an id")
        if keys:
            try:
                verify(bundle, keys)
            except SealError as exc:
                raise ApiError(400, "security", exc.message) from None
        now = datetime.now(UTC)
        response = orjson.dumps(_response_message(header, endpoint, now))
        first = received.store(
            {
                "message_id": header["id"],
                "bundle_id": str(bundle.get("id", "")),
                "received_at": now,
                "response": response.decode(),
                "body": body.decode(),  # as received (decrypted): what was verified, byte for byte
            }
        )
        if first is not None:  # a resend: the original answer, nothing processed again
            return Response(first.encode(), media_type=FHIR_JSON)
        return Response(response, media_type=FHIR_JSON)

    routes = [r for r in app.routes if isinstance(r, APIRoute) and r.endpoint is process_message]
    app.add_middleware(_Shortcut, routes=routes, endpoint=process_message, refuse=app.exception_handlers[GatewayError])
    app.add_middleware(BodyLimit, max_bytes=max_bytes)  # outside the shortcut: it limits every request

    @app.get("/messages")
    def messages() -> Response:
        with engine.connect() as conn:
            rows = conn.execute(
                select(_received.c.message_id, _received.c.received_at).order_by(_received.c.received_at)
            )
            return _json([{"messageHeader": r.message_id, "received": r.received_at.isoformat()} for r in rows])

    return app
