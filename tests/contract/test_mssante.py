"""Contract of the MSSanté transport, against real SMTP servers on loopback (aiosmtpd, STARTTLS).

What the far end relies on: the mail arrives over TLS from the application mailbox, with a stable
``Message-ID``, the ``X-MSS-*`` headers, an MDN request and an ``IHE_XDM.ZIP`` whose metadata matches
its files; a social recipient's mail holds no CDA; an S/MIME signature verifies (``openssl smime``).
What the gateway relies on: SMTP replies and network failures are classified, and MDNs sent back to
its inbox over SMTP acknowledge or dead-letter the delivery in the real outbox — once.
"""

from __future__ import annotations

import base64
import copy
import email
import hashlib
import io
import ipaddress
import shutil
import smtplib
import socket
import ssl
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from sqlalchemy import create_engine

from gateway import seal, validate
from gateway.api.app import create_app
from gateway.deliver import Deliverer
from gateway.mdn import apply_mdn, inbox_from_env, parse_mdn, start_inbox
from gateway.outbox import Outbox
from gateway.settings import Settings, SettingsError
from gateway.store import ResourceStore
from gateway.transports import xdm
from gateway.transports.mssante import SmtpSettings, SmtpTransport, mailbox_of
from tests.conftest import FIXTURES, mappings
from tests.dispatch_cases import run

GATEWAY = "passerelle-sortie@chu-glaciere.mssante.fr"
GP = "paul.roussel@medecin.mssante.fr"
HIS = "his-key-0123456789abcdef0000"
RIM = "{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}"
WHEN = datetime(2026, 10, 30, 11, 45, tzinfo=UTC)


# -- a small PKI: a CA (stands for IGC-Santé), the relay's server certificate, the gateway's certificates --
@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    smime_cert: Path
    smime_key: Path

    def server_context(self, *, client_certificates: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if client_certificates:
            context.load_verify_locations(self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _usage(**on: bool) -> x509.KeyUsage:
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(
        "Test IGC-Santé",
        ca_key,
        None,
        [(x509.BasicConstraints(ca=True, path_length=None), True), (_usage(key_cert_sign=True, crl_sign=True), True)],
    )
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "relay.test",
        server_key,
        (ca, ca_key),
        [
            *leaf,
            (
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        GATEWAY, client_key, (ca, ca_key), [*leaf, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
    )
    smime_key = ec.generate_private_key(ec.SECP256R1())
    smime = _issue(
        GATEWAY,
        smime_key,
        (ca, ca_key),
        [
            *leaf,
            (_usage(digital_signature=True, content_commitment=True), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
            (x509.SubjectAlternativeName([x509.RFC822Name(GATEWAY)]), False),
        ],
    )
    return Pki(
        ca_path,
        *_write(directory, "server", server, server_key),
        *_write(directory, "client", client, client_key),
        *_write(directory, "smime", smime, smime_key),
    )


# -- real SMTP servers ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: dict[str, Any] | None

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Relay:
    """An MSSanté operator's submission relay: records what it accepts, or answers what it is told to."""

    rcpt_reply: str | None = None
    data_reply: str | None = None
    mails: list[Received] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        data = envelope.original_content
        assert isinstance(data, bytes) and envelope.mail_from is not None
        self.mails.append(Received(envelope.mail_from, list(envelope.rcpt_tos), data, session.ssl))
        return "250 2.0.0 Ok: queued as 4F2A1"

    def to(self, mailbox: str) -> Received:
        return next(m for m in self.mails if mailbox in m.rcpt_tos)


@pytest.fixture
def serve() -> Iterator[Callable[..., int]]:
    controllers: list[Controller] = []

    def start(handler: Any, context: ssl.SSLContext | None = None) -> int:
        port = _free_port()
        controller = Controller(
            handler, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=context is not None
        )
        controller.start()
        controllers.append(controller)
        return port

    yield start
    for controller in controllers:
        controller.stop()


def _transport(pki: Pki, port: int, **overrides: Any) -> SmtpTransport:
    base = SmtpSettings(host="127.0.0.1", port=port, sender=GATEWAY, tls=pki.client_context(), timeout=5.0)
    return SmtpTransport(replace(base, **overrides), clock=lambda: WHEN)


# -- sealed messages from the real pipeline ---------------------------------------------------------------
@pytest.fixture(scope="module")
def signer() -> seal.Signer:
    return seal.Signer(seal.generate_key())


@pytest.fixture(scope="module")
def sealed(signer: seal.Signer) -> dict[str, tuple[bytes, str]]:
    """recipient id → (sealed message bytes, MessageHeader.id), for scenario S1 (GP, pharmacist, SAAD...)."""
    return {
        recipient: (
            orjson.dumps(seal.sign(message, signer, "2026-10-30T11:45:00+01:00")),
            message["entry"][0]["resource"]["id"],
        )
        for recipient, message in run("s1-pharmacy").messages.items()
    }


def _zip(mail: Message) -> zipfile.ZipFile:
    parts = [p for p in mail.walk() if p.get_filename() == xdm.ZIP_NAME]
    assert len(parts) == 1
    data = parts[0].get_payload(decode=True)
    assert isinstance(data, bytes)
    return zipfile.ZipFile(io.BytesIO(data))


def _cda_of(payload: bytes) -> bytes:
    for entry in orjson.loads(payload)["entry"]:
        if entry["resource"]["resourceType"] == "DocumentReference":
            return base64.b64decode(entry["resource"]["content"][0]["attachment"]["data"])
    raise AssertionError("no DocumentReference")


# -- the mail --------------------------------------------------------------------------------------------
def test_gp_mail_over_starttls_with_mssante_headers_and_xdm(
    pki: Pki, serve: Callable[..., int], sealed: dict[str, tuple[bytes, str]], signer: seal.Signer
) -> None:
    relay = Relay()
    transport = _transport(pki, serve(relay, pki.server_context()))
    payload, message_id = sealed["PractitionerRole-gp-roussel"]

    outcome = transport.send(payload, f"mailto:{GP}", message_id)

    assert outcome.kind == "sent" and "awaiting MDN" in outcome.detail, outcome
    (received,) = relay.mails
    assert received.tls is not None, "the mail went over STARTTLS"
    assert received.mail_from == GATEWAY and received.rcpt_tos == [GP]
    mail = received.message
    domain = GATEWAY.split("@")[1]
    assert mail["Message-ID"] == f"<{message_id}@{domain}>"
    assert mail["X-Gateway-Message-Id"] == message_id
    assert mail["Disposition-Notification-To"] == f"<{GATEWAY}>" and mail["From"] == GATEWAY
    assert mail["X-MSS-CODECDA"] == "11490-0" and mail["X-MSS-INS"] == "O"
    assert mail["Subject"] == "Lettre de liaison à la sortie d'un établissement de soins"
    assert not {"MARTIN", "LEFEBVRE", "JEANNE"} & set(mail["Subject"].upper().split()), "no patient name in Subject"
    assert all(b < 128 for b in received.data), "7-bit mail: relays never re-encode it"

    archive = _zip(mail)
    subset = "IHE_XDM/SUBSET01/"
    assert archive.namelist() == [
        "INDEX.HTM",
        "README.TXT",
        f"{subset}METADATA.XML",
        f"{subset}MESSAGE.JSON",
        f"{subset}DOC0001.XML",
    ]
    message_bytes = archive.read(f"{subset}MESSAGE.JSON")
    assert message_bytes == payload, "the sealed JSON travels byte for byte"
    assert seal.verify(orjson.loads(message_bytes), [signer.key]) == signer.kid
    assert archive.read(f"{subset}DOC0001.XML") == _cda_of(payload)

    metadata = etree.fromstring(archive.read(f"{subset}METADATA.XML"))
    entries = metadata.findall(f".//{RIM}ExtrinsicObject")
    assert [e.get("mimeType") for e in entries] == ["application/fhir+json", "application/hl7-cda+xml"]
    for entry in entries:
        slots = {s.get("name"): [v.text for v in s.iter(f"{RIM}Value")] for s in entry.findall(f"{RIM}Slot")}
        data = archive.read(subset + str(slots["URI"][0]))
        assert slots["hash"] == [hashlib.sha1(data).hexdigest()] and slots["size"] == [str(len(data))]
        assert slots["sourcePatientId"] == ["244037511305285^^^&1.2.250.1.213.1.4.10&ISO^NH"]
    codes = {
        c.get("classificationScheme"): c.get("nodeRepresentation") for c in entries[1].findall(f"{RIM}Classification")
    }
    assert codes[xdm.DE_TYPE] == "11490-0" and codes[xdm.DE_FORMAT] == "urn:asip:ci-sis:ldl-ses:2017"
    unique_ids = {e.get("identificationScheme"): e.get("value") for e in metadata.iter(f"{RIM}ExternalIdentifier")}
    assert unique_ids[xdm.SS_PATIENT_ID] == "244037511305285^^^&1.2.250.1.213.1.4.10&ISO^NH"
    assert metadata.findall(f".//{RIM}Association")[0].get("sourceObject") == metadata.find(
        f".//{RIM}RegistryPackage"
    ).get("id")  # type: ignore[union-attr]

    again = transport.send(payload, f"mailto:{GP}", message_id)
    assert again.kind == "sent"
    assert relay.mails[1].message["Message-ID"] == mail["Message-ID"], "the same Message-ID on every retry"
    assert _zip(relay.mails[1].message).read(f"{subset}METADATA.XML") == archive.read(f"{subset}METADATA.XML")


def test_a_social_recipient_gets_no_cda(
    pki: Pki, serve: Callable[..., int], sealed: dict[str, tuple[bytes, str]]
) -> None:
    relay = Relay()
    transport = _transport(pki, serve(relay, pki.server_context()))
    payload, message_id = sealed["Organization-saad-tilleuls"]

    assert transport.send(payload, "mailto:accueil@saad-tilleuls.mssante.fr", message_id).kind == "sent"

    mail = relay.mails[0].message
    assert mail["X-MSS-CODECDA"] is None and mail["X-MSS-INS"] is None
    assert mail["Subject"] == xdm.GENERIC_TITLE
    archive = _zip(mail)
    assert not [n for n in archive.namelist() if "DOC" in n], "no original letter for a social recipient"
    assert b"ClinicalDocument" not in received_bytes(archive)


def received_bytes(archive: zipfile.ZipFile) -> bytes:
    return b"".join(archive.read(n) for n in archive.namelist())


def test_a_patient_name_never_reaches_the_subject(sealed: dict[str, tuple[bytes, str]]) -> None:
    message = orjson.loads(sealed["PractitionerRole-gp-roussel"][0])
    for entry in message["entry"]:
        if entry["resource"]["resourceType"] == "DocumentReference":
            entry["resource"]["type"] = {"text": "Lettre de sortie de Mme Martin Lefebvre"}
    assert xdm.read_message(orjson.dumps(message)).title == xdm.GENERIC_TITLE


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to verify S/MIME independently")
def test_smime_signature_verifies_and_tampering_breaks_it(
    pki: Pki, serve: Callable[..., int], sealed: dict[str, tuple[bytes, str]], tmp_path: Path
) -> None:
    relay = Relay()
    transport = _transport(
        pki, serve(relay, pki.server_context()), smime_cert_file=pki.smime_cert, smime_key_file=pki.smime_key
    )
    payload, message_id = sealed["PractitionerRole-gp-roussel"]
    assert transport.send(payload, f"mailto:{GP}", message_id).kind == "sent"
    raw = relay.mails[0].data
    mail = relay.mails[0].message
    assert mail.get_content_type() == "multipart/signed"
    assert mail.get_param("protocol") == "application/x-pkcs7-signature" and mail.get_param("micalg") == "sha-256"
    signed, signature = mail.iter_parts()
    assert (
        signed.get_content_type() == "multipart/mixed" and _zip(signed).read("IHE_XDM/SUBSET01/MESSAGE.JSON") == payload
    )
    der = signature.get_payload(decode=True)
    assert isinstance(der, bytes)
    certificates = pkcs7.load_der_pkcs7_certificates(der)
    assert x509.load_pem_x509_certificate(pki.smime_cert.read_bytes()) in certificates
    assert mail["X-MSS-CODECDA"] == "11490-0", "the MSSanté headers stay readable outside the signature"

    def verify(data: bytes) -> subprocess.CompletedProcess[bytes]:
        path = tmp_path / "mail.eml"
        path.write_bytes(data)
        return subprocess.run(
            ["openssl", "smime", "-verify", "-in", str(path), "-CAfile", str(pki.ca), "-out", str(tmp_path / "out")],
            capture_output=True,
            check=False,
        )

    good = verify(raw)
    assert good.returncode == 0, good.stderr
    assert b"Verification successful" in good.stderr
    assert (tmp_path / "out").read_bytes().replace(b"\r\n", b"\n").count(b"IHE_XDM.ZIP") >= 1
    tampered = raw.replace(b"MSSant=C3=A9 est", b"MSSant=C3=A9 EST", 1)
    assert tampered != raw
    assert verify(tampered).returncode != 0


def test_mutual_tls_presents_the_gateway_certificate(
    pki: Pki, serve: Callable[..., int], sealed: dict[str, tuple[bytes, str]]
) -> None:
    relay = Relay()
    port = serve(relay, pki.server_context(client_certificates=True))
    payload, message_id = sealed["PractitionerRole-gp-roussel"]
    context = pki.client_context()
    context.load_cert_chain(pki.client_cert, pki.client_key)

    assert _transport(pki, port, tls=context).send(payload, f"mailto:{GP}", message_id).kind == "sent"

    tls = relay.mails[0].tls
    assert tls is not None and dict(x[0] for x in tls["peercert"]["subject"])["commonName"] == GATEWAY
    refused = _transport(pki, port).send(payload, f"mailto:{GP}", message_id)
    assert refused.kind == "transient" and len(relay.mails) == 1, "no certificate, no mail"


# -- outcomes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("relay", "kind", "words"),
    [
        (Relay(rcpt_reply="550 5.1.1 <paul.roussel@medecin.mssante.fr>: mailbox unknown"), "permanent", "RCPT TO: 550"),
        (Relay(rcpt_reply="450 4.2.1 mailbox busy, try later"), "transient", "RCPT TO: 450"),
        (Relay(data_reply="451 4.3.0 queue full, try again"), "transient", "DATA: 451"),
        (Relay(data_reply="554 5.7.1 domain not in the MSSanté trust space"), "permanent", "DATA: 554"),
    ],
    ids=["550-unknown-mailbox", "450-busy", "451-queue-full", "554-rejected"],
)
def test_smtp_replies_are_classified(
    pki: Pki,
    serve: Callable[..., int],
    sealed: dict[str, tuple[bytes, str]],
    relay: Relay,
    kind: str,
    words: str,
) -> None:
    payload, message_id = sealed["PractitionerRole-gp-roussel"]
    outcome = _transport(pki, serve(relay, pki.server_context())).send(payload, f"mailto:{GP}", message_id)
    assert outcome.kind == kind and words in outcome.detail, outcome


def test_network_failures_are_transient_and_insecure_servers_permanent(
    pki: Pki, serve: Callable[..., int], sealed: dict[str, tuple[bytes, str]]
) -> None:
    payload, message_id = sealed["PractitionerRole-gp-roussel"]
    closed = _transport(pki, _free_port()).send(payload, f"mailto:{GP}", message_id)
    assert closed.kind == "transient" and "ConnectionRefused" in closed.detail, closed

    clear = Relay()
    port = serve(clear)  # no STARTTLS offered
    refused = _transport(pki, port).send(payload, f"mailto:{GP}", message_id)
    assert refused.kind == "permanent" and "STARTTLS" in refused.detail and not clear.mails, refused
    assert _transport(pki, port, require_starttls=False).send(payload, f"mailto:{GP}", message_id).kind == "sent"

    untrusted = _transport(pki, serve(Relay(), pki.server_context()), tls=ssl.create_default_context())
    outcome = untrusted.send(payload, f"mailto:{GP}", message_id)
    assert outcome.kind == "permanent" and "not trusted" in outcome.detail, outcome


def test_bad_endpoints_and_payloads_are_refused_before_any_connection(
    pki: Pki, sealed: dict[str, tuple[bytes, str]]
) -> None:
    transport = _transport(pki, _free_port())  # nothing listens: a connection attempt would be "transient"
    payload, message_id = sealed["PractitionerRole-gp-roussel"]
    for endpoint in (
        f"mailto:{GP}?subject=hello",
        f"mailto:{GP},other@medecin.mssante.fr",
        "mailto:Paul <paul@medecin.mssante.fr>",
        "mailto:paul@medecin.mssante.fr%0d%0aBcc:spy@evil.example",
        "mailto:",
    ):
        outcome = transport.send(payload, endpoint, message_id)
        assert outcome.kind == "permanent" and "not a single mailbox" in outcome.detail, endpoint
    assert transport.send(payload, f"mailto:{GP}", "another-id").kind == "permanent"
    assert transport.send(b"{not json", f"mailto:{GP}", message_id).kind == "permanent"
    assert (
        transport.send(b'{"resourceType":"Bundle","type":"collection","entry":[]}', f"mailto:{GP}", message_id).kind
        == "permanent"
    )
    assert xdm.safe_name("../../etc/passwd") == "FILE.ETCP" and "/" not in xdm.safe_name("a/b\\c.xml")


def test_settings_from_the_environment(pki: Pki) -> None:
    assert SmtpSettings.from_env({}) is None
    read = SmtpSettings.from_env(
        {
            "GATEWAY_SMTP_HOST": "smtp.mssante.example.fr",
            "GATEWAY_SMTP_SENDER": GATEWAY,
            "GATEWAY_SMTP_PORT": "2587",
            "GATEWAY_SMTP_CA_FILE": str(pki.ca),
            "GATEWAY_SMTP_CERT_FILE": str(pki.client_cert),
            "GATEWAY_SMTP_KEY_FILE": str(pki.client_key),
            "GATEWAY_SMIME_CERT_FILE": str(pki.smime_cert),
            "GATEWAY_SMIME_KEY_FILE": str(pki.smime_key),
        }
    )
    assert read is not None and read.port == 2587 and read.require_starttls and read.tls is not None
    assert SmtpTransport(read).signer is not None
    for bad in (
        {"GATEWAY_SMTP_HOST": "h", "GATEWAY_SMTP_SENDER": "not a mailbox"},
        {"GATEWAY_SMTP_HOST": "h", "GATEWAY_SMTP_SENDER": GATEWAY, "GATEWAY_SMTP_PORT": "x"},
        {"GATEWAY_SMTP_HOST": "h", "GATEWAY_SMTP_SENDER": GATEWAY, "GATEWAY_SMIME_CERT_FILE": str(pki.smime_cert)},
        {"GATEWAY_SMTP_HOST": "h", "GATEWAY_SMTP_SENDER": GATEWAY, "GATEWAY_SMTP_CA_FILE": "/nonexistent/ca.pem"},
    ):
        with pytest.raises(SettingsError):
            SmtpSettings.from_env(bad)
    mismatched = SmtpSettings(host="h", sender=GATEWAY, smime_cert_file=pki.smime_cert, smime_key_file=pki.client_key)
    with pytest.raises(SettingsError, match="do not match"):
        SmtpTransport(mismatched)


# -- MDNs, end to end: POST /letters → worker → relay → far end → MDN → inbox → outbox ----------------
def build_mdn(
    original: Received,
    disposition: str,
    *,
    final_recipient: str | None = None,
    original_message_id: bool = True,
    machine_part: bool = True,
    whole_original: bool = True,
) -> bytes:
    """What the recipient's software sends back (RFC 8098 and the ANS MDN structure)."""
    mail = original.message
    recipient = final_recipient or original.rcpt_tos[0]
    report = EmailMessage(policy=policy.SMTP)
    report["From"] = recipient
    report["To"] = GATEWAY
    report["Subject"] = "Accusé de traitement"
    report["Message-ID"] = f"<mdn-{abs(hash(disposition))}@far.example>"
    report.set_type("multipart/report")
    report.set_param("report-type", "disposition-notification")
    human = EmailMessage(policy=policy.SMTP)
    human.set_content("Votre message a été intégré.")
    parts: list[Message | str] = [human]
    if machine_part:
        fields = [
            "Reporting-UA: far.example; PFI 1.0",
            f"Original-Recipient: rfc822; {recipient}",
            f"Final-Recipient: rfc822; {recipient}",
            f"Disposition: automatic-action/MDN-sent-automatically; {disposition}",
        ]
        if original_message_id:
            fields.insert(2, f"Original-Message-ID: {mail['Message-ID']}")
        machine = Message()
        machine.set_type("message/disposition-notification")
        machine.set_payload("\r\n".join(fields) + "\r\n")
        parts.append(machine)
    if whole_original:
        returned = Message()
        returned.set_type("message/rfc822")
        returned.set_payload([email.message_from_bytes(original.data)])
    else:
        returned = Message()
        returned.set_type("text/rfc822-headers")
        returned.set_payload("".join(f"{k}: {v}\r\n" for k, v in mail.items() if k in ("Message-ID", "From", "To")))
    parts.append(returned)
    report.set_payload(parts)
    return report.as_bytes(policy=policy.SMTP)


def to_inbox(pki: Pki, port: int, raw: bytes, sender: str = GP) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
        smtp.starttls(context=pki.client_context())
        smtp.ehlo()
        smtp.mail(sender)
        smtp.rcpt(GATEWAY)
        try:
            code, text = smtp.data(raw)
        except smtplib.SMTPDataError as exc:
            code, text = exc.smtp_code, exc.smtp_error if isinstance(exc.smtp_error, bytes) else exc.smtp_error.encode()
        return code, text.decode()


@pytest.fixture
def world(tmp_path: Path, pki: Pki, signer: seal.Signer, serve: Callable[..., int]) -> Iterator[dict[str, Any]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'gw.db'}")
    store, outbox = ResourceStore(engine=engine), Outbox(engine)
    dispatch = FIXTURES / "dispatch"
    for entry in orjson.loads((dispatch / "directory.json").read_bytes())["entry"]:
        res = copy.deepcopy(entry["resource"])
        if res["resourceType"] == "Endpoint" and not res["address"].startswith("mailto:"):
            res["address"] = f"mailto:{res['id']}@partenaires.mssante.fr"  # everyone on MSSanté
            res["connectionType"]["code"] = "direct-project"
        store.put(res["resourceType"], res["id"], res)
    for entry in orjson.loads((dispatch / "consents-s1.json").read_bytes())["entry"]:
        res = entry["resource"]
        store.put("Consent", res["id"], res, at=datetime.fromisoformat(res["meta"]["lastUpdated"]))
    relay = Relay()
    smtp = _transport(pki, serve(relay, pki.server_context()))
    settings = Settings(api_keys={HIS: frozenset({"his"})})
    worker = Deliverer(
        outbox=outbox, store=store, mappings=mappings(), settings=settings, signer=signer, transports={"mailto": smtp}
    )
    inbox_port = _free_port()
    inbox = start_inbox(
        outbox, "127.0.0.1", inbox_port, pki.server_context(), domain=GATEWAY.split("@")[1], mailboxes=[GATEWAY]
    )
    with TestClient(create_app(settings, store, outbox, mappings())) as client:
        yield {"client": client, "outbox": outbox, "worker": worker, "relay": relay, "inbox": inbox_port}
    inbox.stop()
    worker.close()
    engine.dispose()


def _sent_s1(world: dict[str, Any]) -> Callable[[str], tuple[str, str | None]]:
    """Push the S1 letter and hand its 6 messages to the relay; returns state(mailbox) → (status, error)."""
    answer = world["client"].post(
        "/letters",
        content=(FIXTURES / "dispatch" / "ldl-ses-s1-pharmacy.xml").read_bytes(),
        headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"},
    )
    assert answer.status_code == 202, answer.text
    assert world["worker"].run_once() == 6
    outbox: Outbox = world["outbox"]

    def state(mailbox: str) -> tuple[str, str | None]:
        found = next(d for d in outbox.deliveries() if d.endpoint == f"mailto:{mailbox}")
        return found.status, found.last_error

    return state


def test_mdns_acknowledge_or_dead_letter_deliveries_once(world: dict[str, Any], pki: Pki) -> None:
    outbox, worker, relay, inbox = (world[k] for k in ("outbox", "worker", "relay", "inbox"))
    state = _sent_s1(world)
    status = {d.endpoint: d for d in outbox.deliveries()}
    assert {d.status for d in status.values()} == {"sent"} and len(relay.mails) == 6
    assert all(m.tls is not None for m in relay.mails)
    assert worker.run_once() == 0, "a sent delivery waits for its MDN, it is not re-sent"

    gp_mail = relay.to(GP)
    assert gp_mail.message["X-Gateway-Message-Id"] in {d.message_id for d in status.values()}
    saad_mail = relay.to("ep-saad-tilleuls@partenaires.mssante.fr")
    assert (
        saad_mail.message["X-MSS-CODECDA"] is None
        and "IHE_XDM/SUBSET01/DOC0001.XML" not in _zip(saad_mail.message).namelist()
    )
    audit_before = len(outbox.audit_events())

    code, text = to_inbox(pki, inbox, build_mdn(gp_mail, "processed"))
    assert (code, state(GP)) == (250, ("acknowledged", None)), text
    acks = outbox.audit_events()[audit_before:]
    assert len(acks) == 1 and acks[0]["outcome"] == "0" and "processed" in acks[0]["outcomeDesc"]
    assert gp_mail.message["X-Gateway-Message-Id"] in acks[0]["entity"][0]["description"]
    validate.check(acks[0], fhir_json=True)

    code, text = to_inbox(pki, inbox, build_mdn(gp_mail, "processed"))
    assert code == 250 and "ignored" in text and state(GP) == ("acknowledged", None), "a duplicate MDN changes nothing"
    assert len(outbox.audit_events()) == audit_before + 1

    pharmacist = "julien.lemaire@pharmacien.mssante.fr"
    code, text = to_inbox(
        pki, inbox, build_mdn(relay.to(pharmacist), "processed/Error: 12^Document illisible"), pharmacist
    )
    status_now, error = state(pharmacist)
    assert code == 250 and status_now == "dead-lettered" and error is not None and "12^Document illisible" in error, (
        text
    )
    assert outbox.audit_events()[-1]["outcome"] == "8"

    nurse = "claire.benoit@infirmier.mssante.fr"
    code, text = to_inbox(pki, inbox, build_mdn(relay.to(nurse), "processed", machine_part=False), nurse)
    assert code == 550 and "no message/disposition-notification part" in text and state(nurse)[0] == "sent"
    code, text = to_inbox(pki, inbox, b"\x00\xff garbage \r\n\r\n\x80", nurse)
    assert code == 250 and "ignored" in text, "not a report: ignored, and the inbox does not crash"
    code, text = to_inbox(
        pki, inbox, build_mdn(relay.to(nurse), "displayed", original_message_id=False, whole_original=False), nurse
    )
    assert code == 250 and state(nurse) == ("acknowledged", None), text

    cardiologist = "nadia.bensaid@chu-glaciere.mssante.fr"
    forged = build_mdn(relay.to(cardiologist), "processed", final_recipient="intruder@elsewhere.mssante.fr")
    code, text = to_inbox(pki, inbox, forged, "intruder@elsewhere.mssante.fr")
    assert code == 550 and "for a message sent to" in text and state(cardiologist)[0] == "sent"

    with smtplib.SMTP("127.0.0.1", inbox, timeout=5) as smtp:
        assert smtp.mail(GP)[0] == 530, "the inbox requires STARTTLS"
        smtp.starttls(context=pki.client_context())
        smtp.ehlo()
        smtp.mail(GP)
        assert smtp.rcpt("someone-else@chu-glaciere.mssante.fr")[0] == 550
    assert worker.run_once() == 0


def test_inbox_from_the_environment(tmp_path: Path, pki: Pki) -> None:
    outbox = Outbox(create_engine(f"sqlite:///{tmp_path / 'o.db'}"))
    assert inbox_from_env(outbox, GATEWAY, {}) is None
    for bad in ("0.0.0.0:2525", "nonsense", "127.0.0.1:port"):
        with pytest.raises(SettingsError):
            inbox_from_env(outbox, GATEWAY, {"GATEWAY_MDN_LISTEN": bad})
    port = _free_port()
    tls = {"TLS_CERT_FILE": pki.server_cert, "TLS_KEY_FILE": pki.server_key, "CLIENT_CA_FILE": pki.ca}
    env = {"GATEWAY_MDN_LISTEN": f"127.0.0.1:{port}", **{f"GATEWAY_MDN_{k}": str(v) for k, v in tls.items()}}
    inbox = inbox_from_env(outbox, GATEWAY, env)
    assert inbox is not None
    try:
        context = pki.client_context()
        context.load_cert_chain(pki.client_cert, pki.client_key)  # the operator's relay, mutual TLS
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
            smtp.starttls(context=context)
            smtp.ehlo()
            smtp.mail(GP)
            assert smtp.rcpt("other@chu-glaciere.mssante.fr")[0] == 550, "only the application mailbox"
            assert smtp.rcpt(GATEWAY)[0] == 250
            code, text = smtp.data(_raw_mdn("processed"))
            assert code == 250 and b"no delivery awaits" in text
    finally:
        inbox.stop()


# -- MDN parsing, alone ------------------------------------------------------------------------------------
def _raw_mdn(disposition: str, extra: str = "", message_id: str = "<abc-123@chu-glaciere.mssante.fr>") -> bytes:
    return (
        'Content-Type: multipart/report; report-type="disposition-notification"; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nlu\r\n"
        "--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
        f"Final-Recipient: rfc822; {GP}\r\nOriginal-Message-ID: {message_id}\r\n"
        f"Disposition: automatic-action/MDN-sent-automatically; {disposition}\r\n{extra}"
        "\r\n--b--\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("disposition", "extra", "ok", "detail"),
    [
        ("processed", "", True, "processed"),
        ("displayed", "", True, "displayed"),
        ("dispatched", "", True, "dispatched"),
        ("processed/Error: 12^Patient inconnu", "", False, "processed: 12^Patient inconnu"),
        ("processed/error", "Error: CDA invalide\r\n", False, "processed: CDA invalide"),
        ("deleted", "", False, "deleted: no error text"),
        ("failed", "Failure: disque plein\r\n", False, "failed: disque plein"),
    ],
)
def test_dispositions(disposition: str, extra: str, ok: bool, detail: str) -> None:
    mdn = parse_mdn(_raw_mdn(disposition, extra))
    assert (mdn.message_id, mdn.domain, mdn.recipients, mdn.ok, mdn.detail) == (
        "abc-123",
        "chu-glaciere.mssante.fr",
        (GP,),
        ok,
        detail,
    )


def build_dsn(original: Received, action: str, *, final_recipient: str | None = None) -> bytes:
    """What the recipient's relay sends back when it cannot deliver (RFC 3464), returning the headers."""
    mail = original.message
    recipient = final_recipient or original.rcpt_tos[0]
    report = EmailMessage(policy=policy.SMTP)
    report["From"] = "MAILER-DAEMON@relay.partenaires.mssante.fr"
    report["To"] = GATEWAY
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Message-ID"] = f"<dsn-{action}@relay.partenaires.mssante.fr>"
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    human = EmailMessage(policy=policy.SMTP)
    human.set_content("Votre message n'a pas pu être remis.")
    per_message, per_recipient = Message(), Message()
    per_message["Reporting-MTA"] = "dns; relay.partenaires.mssante.fr"
    per_recipient["Final-Recipient"] = f"rfc822; {recipient}"
    per_recipient["Action"] = action
    per_recipient["Status"] = "5.1.1" if action == "failed" else "4.4.1"
    per_recipient["Diagnostic-Code"] = "smtp; 550 5.1.1 <boite inconnue>: Recipient address rejected"
    status = Message()
    status.set_type("message/delivery-status")
    status.set_payload([per_message, per_recipient])
    returned = Message()
    returned.set_type("text/rfc822-headers")
    returned.set_payload("".join(f"{k}: {v}\r\n" for k, v in mail.items() if k in ("Message-ID", "From", "To")))
    report.set_payload([human, status, returned])
    return report.as_bytes(policy=policy.SMTP)


def test_a_bounce_dead_letters_the_delivery_with_its_reason(world: dict[str, Any], pki: Pki) -> None:
    """An unknown MSSanté mailbox: the relay's DSN dead-letters the delivery at once (visible, audited,
    replayable after the directory is fixed) instead of leaving it to wait a day for an MDN."""
    outbox, relay, inbox = (world[k] for k in ("outbox", "relay", "inbox"))
    state = _sent_s1(world)

    daemon = "MAILER-DAEMON@relay.partenaires.mssante.fr"
    code, text = to_inbox(pki, inbox, build_dsn(relay.to(GP), "delayed"), daemon)
    assert code == 250 and "ignored" in text and state(GP) == ("sent", None), "a delay notice changes nothing"
    forged = build_dsn(relay.to(GP), "failed", final_recipient="someone-else@partenaires.mssante.fr")
    code, text = to_inbox(pki, inbox, forged, daemon)
    assert code == 550 and "for a message sent to" in text and state(GP)[0] == "sent"

    audit_before = len(outbox.audit_events())
    code, text = to_inbox(pki, inbox, build_dsn(relay.to(GP), "failed"), daemon)
    status, error = state(GP)
    assert code == 250 and status == "dead-lettered", text
    assert error is not None and "5.1.1" in error and "Recipient address rejected" in error
    [event] = outbox.audit_events()[audit_before:]
    assert event["outcome"] == "8" and "DSN failed 5.1.1" in event["outcomeDesc"]
    validate.check(event, fhir_json=True)
    code, text = to_inbox(pki, inbox, build_dsn(relay.to(GP), "failed"), daemon)
    assert code == 250 and "ignored" in text, "the same bounce again changes nothing"
    assert {d.status for d in outbox.deliveries() if d.endpoint != f"mailto:{GP}"} == {"sent"}


def test_mails_that_are_not_usable_mdns_get_a_reason(tmp_path: Path) -> None:
    outbox = Outbox(create_engine(f"sqlite:///{tmp_path / 'o.db'}"))
    now = datetime.now(UTC)
    for raw, status, words in [
        (b"Subject: hello\r\n\r\nbonjour", "ignored", "not an MDN"),
        (b"", "ignored", "not an MDN"),
        (  # a bounce (DSN) is read too: one without its machine part cannot be
            _raw_mdn("processed").replace(b'disposition-notification"', b'delivery-status"'),
            "refused",
            "no message/delivery-status part",
        ),
        (_raw_mdn("denied"), "refused", "unknown disposition type"),
        (_raw_mdn("processed", message_id="abc"), "refused", "not <id@domain>"),
        (_raw_mdn("processed").replace(b"Disposition: ", b"X-Nothing: "), "refused", "no Disposition"),
        (
            _raw_mdn("processed").replace(b"Final-Recipient: rfc822; ", b"Final-Recipient: rfc822; x"),
            "ignored",
            "no delivery",
        ),
        (_raw_mdn("processed"), "ignored", "no delivery awaits"),
        (_raw_mdn("processed", message_id="<abc@other.example>"), "ignored", "another domain"),
        (
            b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\nno parts",
            "refused",
            "without parts",
        ),
    ]:
        result = apply_mdn(outbox, raw, now, domain="chu-glaciere.mssante.fr")
        assert result.status == status and words in result.detail, (raw[:60], result)
    assert outbox.audit_events() == []


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=400).map(lambda t: _raw_mdn("processed", extra=t + "\r\n")))
def test_no_mail_crashes_the_mdn_reader(raw: bytes) -> None:
    try:
        parse_mdn(raw)
    except Exception as exc:
        assert type(exc).__name__ in ("NotAnMdn", "MalformedMdn"), repr(exc)


def test_mailbox_of() -> None:
    assert mailbox_of("mailto:Paul.Roussel@medecin.mssante.fr") == "Paul.Roussel@medecin.mssante.fr"
    assert mailbox_of("mailto:paul%2Broussel@medecin.mssante.fr") == "paul+roussel@medecin.mssante.fr"
    for bad in ("mailto:a@b..fr", "mailto:a@@b.fr", "a b@c.fr", "mailto:a@b.fr\r\nBcc: x@y.fr"):
        with pytest.raises(ValueError):
            mailbox_of(bad)


def test_a_receipt_that_never_comes_is_dead_lettered_and_a_late_one_still_counts(
    world: dict[str, Any], pki: Pki
) -> None:
    client, outbox, worker, relay, inbox = (world[k] for k in ("client", "outbox", "worker", "relay", "inbox"))
    answer = client.post(
        "/letters",
        content=(FIXTURES / "dispatch" / "ldl-ses-s1-pharmacy.xml").read_bytes(),
        headers={"Authorization": f"Bearer {HIS}", "Content-Type": "application/hl7-cda+xml"},
    )
    assert answer.status_code == 202 and worker.run_once() == 6
    handed_over = max(d.sent_at for d in outbox.deliveries() if d.sent_at is not None)
    wait = timedelta(seconds=worker.settings.ack_timeout_seconds)
    assert worker.expire_unacknowledged(handed_over + wait - timedelta(seconds=1)) == [], "not yet"
    code, _ = to_inbox(pki, inbox, build_mdn(relay.to(GP), "processed"))
    assert code == 250
    audit_before = len(outbox.audit_events())
    expired = worker.expire_unacknowledged(handed_over + wait)
    by_id = {d.message_id: d for d in outbox.deliveries()}
    assert len(expired) == 5, "every delivery still waiting, not the acknowledged one"
    assert all(
        by_id[m].status == "dead-lettered" and "no acknowledgement within" in str(by_id[m].last_error) for m in expired
    )
    events = outbox.audit_events()[audit_before:]
    assert len(events) == 5 and {e["subtype"][1]["code"] for e in events} == {"unacknowledged"}
    for event in events:
        validate.check(event, fhir_json=True)
    assert worker.expire_unacknowledged(handed_over + 2 * wait) == [], "given up once"
    dead = client.get("/deliveries?status=dead-lettered", headers={"Authorization": f"Bearer {HIS}"})
    assert dead.status_code == 403  # operators (admin, auditor) see them; a HIS key does not

    nurse = "claire.benoit@infirmier.mssante.fr"
    code, text = to_inbox(pki, inbox, build_mdn(relay.to(nurse), "processed"), nurse)
    nurse_delivery = next(d for d in outbox.deliveries() if d.endpoint == f"mailto:{nurse}")
    assert code == 250 and nurse_delivery.status == "acknowledged", f"a late receipt still proves delivery: {text}"
