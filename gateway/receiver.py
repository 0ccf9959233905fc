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

import ssl
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from joserfc.jwk import ECKey
from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, bindparam, select
from sqlalchemy.exc import IntegrityError

from gateway.api.auth import StrPath, uvicorn_tls_options
from gateway.api.limits import BodyLimit
from gateway.api.outcomes import FHIR_JSON, ApiError, install
from gateway.crypt import JOSE, JOSE_JSON, CryptError, PrivateKey, decrypt
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
# built once: ``insert().values(...)`` per message was a new statement and a new cache key each time
_INSERT = _received.insert()
_FIRST_RESPONSE = select(_received.c.response).where(_received.c.message_id == bindparam("message_id"))


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
    keys = list(trusted_keys)
    private = list(decryption_keys)
    app = FastAPI(title="Reference FHIR messaging receiver", version="0.1.0")
    install(app)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

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
        try:  # the first time: one statement; the primary key catches a resend, even a concurrent one
            with engine.begin() as conn:
                conn.execute(
                    _INSERT,
                    {
                        "message_id": header["id"],
                        "bundle_id": str(bundle.get("id", "")),
                        "received_at": now,
                        "response": response.decode(),
                        "body": body.decode(),  # as received (decrypted): what was verified, byte for byte
                    },
                )
        except IntegrityError:  # a resend: the original answer, nothing processed again
            with engine.connect() as conn:
                first = conn.execute(_FIRST_RESPONSE, {"message_id": header["id"]}).scalar_one()
                return Response(first.encode(), media_type=FHIR_JSON)
        return Response(response, media_type=FHIR_JSON)

    @app.get("/messages")
    def messages() -> Response:
        with engine.connect() as conn:
            rows = conn.execute(
                select(_received.c.message_id, _received.c.received_at).order_by(_received.c.received_at)
            )
            return _json([{"messageHeader": r.message_id, "received": r.received_at.isoformat()} for r in rows])

    return app
