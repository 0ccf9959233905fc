"""Mutual TLS, encryption for recipients that publish a certificate, and client-certificate authentication,
over real TLS on loopback: uvicorn servers in threads, a test PKI made with ``cryptography``, no mocks.

Decisions tested here: a receiver that refuses our client certificate (or gets none) is a *transient*
outcome — the message is fine, an operator fixes a certificate or a trust store and the same message
then goes through; under TLS 1.3 the refusal is just a closed connection, which cannot be told from a
dropped one — while a receiver whose certificate *we* cannot verify is *permanent* (as in the MSSanté
transport: someone must look before health data goes there).  A recipient encryption certificate that
cannot be used (expired...) is *permanent* and nothing is sent.
"""

from __future__ import annotations

import base64
import copy
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from gateway import crypt
from gateway.api import auth
from gateway.api.app import create_app
from gateway.deliver import Deliverer, RetryPolicy
from gateway.demo import seed_store
from gateway.outbox import Outbox
from gateway.receiver import create_receiver, tls_server_options
from gateway.seal import Signer, generate_key, sign, verify
from gateway.settings import Settings
from gateway.store import ResourceStore
from gateway.transports.base import FHIR_JSON, Outcome
from gateway.transports.http import HttpTransport, tls_context
from tests import pki
from tests.conftest import FIXTURES, mappings
from tests.dispatch_cases import run

DISPATCH = FIXTURES / "dispatch"
ADMIN = "admin-key-0123456789abcdef"
HIS = "his-key-0123456789abcdef0000"


@dataclass(frozen=True)
class Pki:
    ca: Path
    rogue_ca: Path
    server: tuple[Path, Path]
    gateway: tuple[Path, Path]  # the gateway's client certificate towards recipients
    his: tuple[Path, Path]
    auditor: tuple[Path, Path]
    intruder: tuple[Path, Path]  # signed by the CA, but mapped to no role
    his_der: bytes
    auditor_der: bytes
    recipient: pki.Issued  # encryption certificate + key of the receiving organisation
    other: pki.Issued  # someone else's encryption certificate
    expired: pki.Issued


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca, rogue = pki.ca(), pki.ca("Rogue CA")
    (where / "ca.crt").write_bytes(ca.cert_pem)
    (where / "rogue.crt").write_bytes(rogue.cert_pem)
    his, auditor = pki.issue(ca, "his-chu-glaciere", client=True), pki.issue(ca, "dim-auditor", client=True)
    now = pki.NOW
    return Pki(
        ca=where / "ca.crt",
        rogue_ca=where / "rogue.crt",
        server=pki.issue(ca, "localhost", server=True).write(where, "server"),
        gateway=pki.issue(ca, "discharge-gateway", client=True).write(where, "gateway"),
        his=his.write(where, "his"),
        auditor=auditor.write(where, "auditor"),
        intruder=pki.issue(ca, "intruder", client=True).write(where, "intruder"),
        his_der=his.der,
        auditor_der=auditor.der,
        recipient=pki.issue(ca, "saad-les-tilleuls", encryption=True),
        other=pki.issue(ca, "someone-else", encryption=True),
        expired=pki.issue(
            ca,
            "gp-roussel-2024",
            encryption=True,
            not_before=now - timedelta(days=400),
            not_after=now - timedelta(days=1),
        ),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI, **options: Any) -> None:
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def _client(certs: Pki, identity: tuple[Path, Path] | None) -> httpx.Client:
    context = tls_context(certs.ca, *identity) if identity else tls_context(certs.ca)
    return httpx.Client(verify=context, timeout=5.0)


SIGNER = Signer(generate_key())


@pytest.fixture
def receiver(certs: Pki, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """The reference receiver over HTTPS, client certificates required, holding the recipient's key."""
    database = f"sqlite:///{tmp_path / 'rx.db'}"
    app = create_receiver(database, [SIGNER.key], decryption_keys=[crypt.load_private_key(certs.recipient.key_pem)])
    with Server(app, **tls_server_options(*certs.server, certs.ca)) as server:
        yield server, database


def _stored(database: str) -> list[dict[str, Any]]:
    engine = create_engine(database)
    with engine.connect() as conn:
        rows = conn.execute(text("select body from received_message")).scalars().all()
    engine.dispose()
    return [orjson.loads(r) for r in rows]


def _sealed() -> dict[str, Any]:
    return sign(copy.deepcopy(run("s1").messages["PractitionerRole-gp-roussel"]), SIGNER, "2026-10-30T11:30:00+01:00")


def _message_id(message: dict[str, Any]) -> str:
    return str(message["entry"][0]["resource"]["id"])


def test_with_the_gateway_client_certificate_the_message_is_delivered_and_acknowledged(
    certs: Pki, receiver: tuple[Server, str]
) -> None:
    server, database = receiver
    transport = HttpTransport(tls=tls_context(certs.ca, *certs.gateway))
    message = _sealed()
    outcome = transport.send(orjson.dumps(message), f"{server.url}/fhir/ep-1", _message_id(message))
    transport.close()
    assert outcome == Outcome("ok", "acknowledged")
    assert _stored(database) == [message]


def test_a_refused_tls_handshake_is_classified_and_nothing_is_received(
    certs: Pki, receiver: tuple[Server, str]
) -> None:
    server, database = receiver
    message = _sealed()
    for context, kind, reason in (
        # no client certificate: under TLS 1.3 the receiver refuses it after the handshake and just closes
        (tls_context(certs.ca), "transient", "refused client certificate"),
        # we do not trust the receiver's certificate: refused during the handshake, with the reason
        (tls_context(certs.rogue_ca, *certs.gateway), "permanent", "server certificate not trusted"),
    ):
        transport = HttpTransport(tls=context, timeout=3.0)
        outcome = transport.send(orjson.dumps(message), f"{server.url}/fhir", _message_id(message))
        transport.close()
        assert outcome.kind == kind and reason in outcome.detail, outcome
    assert _stored(database) == []


def test_an_encrypted_message_is_decrypted_by_the_receiver_and_stored_as_sealed(
    certs: Pki, receiver: tuple[Server, str]
) -> None:
    server, database = receiver
    message = _sealed()
    token = crypt.encrypt(orjson.dumps(message), crypt.recipient_key(certs.recipient.der, pki.NOW))
    transport = HttpTransport(tls=tls_context(certs.ca, *certs.gateway))
    outcome = transport.send(token, f"{server.url}/fhir", _message_id(message), content_type=crypt.JOSE)
    transport.close()
    assert outcome.kind == "ok", outcome
    [stored] = _stored(database)
    assert stored == message
    verify(stored, [SIGNER.key])


def test_a_tampered_jwe_or_one_for_another_recipient_is_refused_as_security(
    certs: Pki, receiver: tuple[Server, str]
) -> None:
    server, database = receiver
    message = _sealed()
    token = crypt.encrypt(orjson.dumps(message), crypt.recipient_key(certs.recipient.der, pki.NOW))
    head, key, iv, ciphertext, tag = token.split(b".")
    raw = bytearray(base64.urlsafe_b64decode(ciphertext + b"=" * (-len(ciphertext) % 4)))
    raw[100] ^= 0x01
    tampered = b".".join([head, key, iv, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"="), tag])
    not_ours = crypt.encrypt(orjson.dumps(message), crypt.recipient_key(certs.other.der, pki.NOW))
    with _client(certs, certs.gateway) as client:
        for body in (tampered, not_ours, b"definitely.not.a.jwe"):
            answer = client.post(f"{server.url}/$process-message", content=body, headers={"Content-Type": crypt.JOSE})
            assert answer.status_code == 400, answer.text
            issue = answer.json()["issue"][0]
            assert answer.json()["resourceType"] == "OperationOutcome" and issue["code"] == "security"
    transport = HttpTransport(tls=tls_context(certs.ca, *certs.gateway))
    outcome = transport.send(tampered, f"{server.url}/fhir", _message_id(message), content_type=crypt.JOSE)
    transport.close()
    assert outcome.kind == "permanent" and "cannot be decrypted" in outcome.detail
    assert _stored(database) == []


class RecordingTransport(HttpTransport):
    """The real HTTP transport, keeping what it put on the wire."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wire: list[tuple[str, bytes, str]] = []

    def send(self, payload: bytes, endpoint: str, message_id: str, content_type: str = FHIR_JSON) -> Outcome:
        self.wire.append((endpoint, payload, content_type))
        return super().send(payload, endpoint, message_id, content_type)


def _s1_through_a_worker(
    certs: Pki, server: Server, tmp_path: Path, publish: Callable[[dict[str, Any]], None], settings: Settings
) -> tuple[Outbox, RecordingTransport, int, Engine]:
    """S1 pushed to a gateway whose directory endpoints ``publish`` their certificates, then one worker
    batch over mutual TLS to the receiver: (outbox, what went on the wire, deliveries attempted, engine)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'gw.db'}")
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    seed_store(store, lambda ep: f"{server.url}/fhir/{ep}", endpoint=publish)
    transport = RecordingTransport(tls=tls_context(certs.ca, *certs.gateway))
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings(),
        settings=settings,
        signer=SIGNER,
        transports={"https": transport},
        retry=RetryPolicy(max_attempts=3, initial=5.0),
    )
    with TestClient(create_app(settings, store, outbox, mappings())) as client:
        answer = client.post(
            "/letters",
            content=(DISPATCH / "ldl-ses-s1-pharmacy.xml").read_bytes(),
            headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"},
        )
    assert answer.status_code == 202, answer.text
    attempted = worker.run_once()
    worker.close()
    return outbox, transport, attempted, engine


def test_the_worker_encrypts_for_endpoints_with_a_certificate_and_never_sends_in_clear_to_an_expired_one(
    certs: Pki, receiver: tuple[Server, str], tmp_path: Path
) -> None:
    server, database = receiver

    def publish(endpoint: dict[str, Any]) -> None:
        published = certs.expired if endpoint["id"] == "ep-gp-roussel" else certs.recipient
        endpoint["extension"] = [crypt.certificate_extension(published.der)]

    outbox, transport, attempted, engine = _s1_through_a_worker(
        certs, server, tmp_path, publish, Settings(api_keys={HIS: frozenset({"his"})})
    )
    states = {d.recipient_id: (d.status, d.last_error) for d in outbox.deliveries()}
    assert attempted == len(states) >= 2
    gp = states.pop("PractitionerRole-gp-roussel")
    assert gp[0] == "dead-lettered" and "expired on" in (gp[1] or ""), gp
    assert set(states.values()) == {("acknowledged", None)}
    # on the wire: JWEs only, never the GP's endpoint, no clear content
    assert len(transport.wire) == len(states)
    assert all(ctype == crypt.JOSE and body.count(b".") == 4 for _, body, ctype in transport.wire)
    assert not any("ep-gp-roussel" in endpoint for endpoint, _, _ in transport.wire)
    assert not any(b"MessageHeader" in body or b"Bundle" in body for _, body, _ in transport.wire)
    # the receiver decrypted each one and checked its seal; the GP got nothing
    stored = _stored(database)
    assert len(stored) == len(states)
    for message in stored:
        verify(message, [SIGNER.key])
    assert "PractitionerRole-gp-roussel" not in str([m["entry"][0]["resource"].get("destination") for m in stored])
    # the audit says how each went
    descriptions = [e.get("outcomeDesc", "") for e in outbox.audit_events() if "attempt 1" in e.get("outcomeDesc", "")]
    assert sum("signed and encrypted (JWE ECDH-ES+A256KW/A256GCM" in d for d in descriptions) == len(states)
    assert sum("not sent in clear" in d and "expired on" in d for d in descriptions) == 1
    engine.dispose()


def test_with_trusted_authorities_a_certificate_from_anyone_else_is_never_encrypted_for(
    certs: Pki, receiver: tuple[Server, str], tmp_path: Path
) -> None:
    """``GATEWAY_RECIPIENT_CA_FILE``: the GP's directory entry publishes a certificate from another
    authority (whoever wrote it could then read the letter): that delivery is dead-lettered with the
    reason and nothing goes to it; the others, issued under the trusted authority, are delivered."""
    server, _ = receiver
    rogue = pki.issue(pki.ca("Rogue authority"), "gp-roussel", encryption=True)

    def publish(endpoint: dict[str, Any]) -> None:
        published = rogue if endpoint["id"] == "ep-gp-roussel" else certs.recipient
        endpoint["extension"] = [crypt.certificate_extension(published.der)]

    settings = Settings(api_keys={HIS: frozenset({"his"})}, recipient_ca_file=certs.ca)
    outbox, transport, _, engine = _s1_through_a_worker(certs, server, tmp_path, publish, settings)
    states = {d.recipient_id: (d.status, d.last_error) for d in outbox.deliveries()}
    gp = states.pop("PractitionerRole-gp-roussel")
    assert gp[0] == "dead-lettered" and "not issued under the trusted authorities" in (gp[1] or ""), gp
    assert states and set(states.values()) == {("acknowledged", None)}
    assert len(transport.wire) == len(states) and not any("ep-gp-roussel" in e for e, _, _ in transport.wire)
    engine.dispose()


@pytest.fixture
def gateway_api(certs: Pki, tmp_path: Path) -> Iterator[Server]:
    """The gateway API over HTTPS: client certificates optional (mode both), mapped to roles."""
    engine = create_engine(f"sqlite:///{tmp_path / 'api.db'}")
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    app = create_app(Settings(api_keys={ADMIN: frozenset({"admin"})}), store, outbox, mappings())
    client_auth = auth.ClientAuth(
        "both",
        auth.parse_client_certificates(
            # the colon form ``openssl x509 -fingerprint -sha256`` prints is accepted as well
            f"{':'.join(auth.fingerprint(certs.his_der)[i : i + 2] for i in range(0, 64, 2))}:his\n"
            f"{auth.fingerprint(certs.auditor_der)}:auditor"
        ),
    )
    auth.install(app, client_auth)

    @app.get("/_test/tls/peer")  # three segments: no generic FHIR route matches it
    def tls(request: Request) -> dict[str, Any]:
        return dict(request.scope["extensions"]["tls"])

    with Server(app, **auth.uvicorn_tls_options(*certs.server, certs.ca, client_auth.cert_reqs)) as server:
        yield server
    engine.dispose()


def _outcome(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome" and answer.json()["issue"][0]["code"] == code


def test_a_mapped_client_certificate_gets_in_with_its_roles(certs: Pki, gateway_api: Server) -> None:
    with _client(certs, certs.auditor) as auditor:
        assert auditor.get(f"{gateway_api.url}/Consent").status_code == 200  # auditor may read
        _outcome(auditor.post(f"{gateway_api.url}/Consent", json={}), 403, "forbidden")  # but not write
        tls = auditor.get(f"{gateway_api.url}/_test/tls/peer").json()
    assert tls["client_cert_name"] == "CN=dim-auditor"
    assert ssl.PEM_cert_to_DER_cert(tls["client_cert_chain"][0]) == certs.auditor_der
    assert tls["tls_version"] in (0x0303, 0x0304) and isinstance(tls["cipher_suite"], int)
    assert tls["server_cert"].startswith("-----BEGIN CERTIFICATE-----") and tls["client_cert_error"] is None
    with _client(certs, certs.his) as his:
        _outcome(his.get(f"{gateway_api.url}/Consent"), 403, "forbidden")  # a HIS does not read consents
        _outcome(his.get(f"{gateway_api.url}/letters/nope"), 404, "not-found")  # authenticated as his


def test_an_unmapped_certificate_is_refused_and_an_api_key_still_works_without_a_certificate(
    certs: Pki, gateway_api: Server
) -> None:
    with _client(certs, certs.intruder) as intruder:
        _outcome(intruder.get(f"{gateway_api.url}/Consent"), 401, "login")
    with _client(certs, None) as anonymous:
        _outcome(anonymous.get(f"{gateway_api.url}/Consent"), 401, "login")
        assert anonymous.get(f"{gateway_api.url}/Consent", headers={"X-API-Key": ADMIN}).status_code == 200
        # a wrong key is refused even though a certificate could have been tried
        _outcome(
            anonymous.get(f"{gateway_api.url}/Consent", headers={"X-API-Key": "wrong-key-0123456789"}), 401, "login"
        )
        assert (
            anonymous.get(f"{gateway_api.url}/_test/tls/peer").json()["client_cert_chain"] == []
        )  # TLS, no certificate


def test_in_client_certificate_mode_the_handshake_requires_a_certificate(certs: Pki, tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'api.db'}")
    app = create_app(Settings(api_keys={ADMIN: frozenset({"admin"})}), ResourceStore(engine=engine))
    client_auth = auth.ClientAuth("client-cert", {auth.fingerprint(certs.auditor_der): frozenset({"auditor"})})
    auth.install(app, client_auth)
    with Server(app, **auth.uvicorn_tls_options(*certs.server, certs.ca, client_auth.cert_reqs)) as server:
        with _client(certs, None) as anonymous, pytest.raises(httpx.TransportError):
            anonymous.get(f"{server.url}/Consent", headers={"X-API-Key": ADMIN})
        with _client(certs, certs.auditor) as auditor:
            assert auditor.get(f"{server.url}/Consent").status_code == 200
            # API keys count for nothing in this mode: the admin key does not lift the auditor's certificate
            _outcome(auditor.post(f"{server.url}/Consent", json={}, headers={"X-API-Key": ADMIN}), 403, "forbidden")
    engine.dispose()
