"""MSSanté transport: the sealed message as an ``IHE_XDM.ZIP`` attachment, submitted over SMTP + STARTTLS.

MSSanté is mail inside a closed trust space: the gateway submits to its operator's relay with its
application mailbox (*BAL applicative*), authenticated by mutual TLS with an IGC-Santé software
certificate and/or a login.  Following the MSSanté content rules, the mail carries the IHE XDM
archive (see :mod:`gateway.transports.xdm`), ``X-MSS-CODECDA`` when a CDA is inside, ``X-MSS-INS``
when that CDA names the patient by INS, and asks for an MDN (``Disposition-Notification-To`` = the
envelope sender, so the far end's loop guard lets it answer).  The ``Message-ID`` is derived from the
FHIR ``MessageHeader.id``, the same on every retry, so MDNs correlate and receivers drop duplicates.
The Subject names the document type, never the patient.  An optional S/MIME signature
(``multipart/signed``) covers the whole MIME body for recipients that check it.

Outcomes: the relay accepting the mail is ``sent`` (the acknowledgement is the MDN, see
:mod:`gateway.mdn`); SMTP 4xx, refused connections, timeouts and broken TLS sessions are
``transient``; SMTP 5xx, an untrusted server certificate, a server that does not offer STARTTLS
(when required) and unusable endpoints or payloads are ``permanent``.  A connection lost after DATA
is ambiguous (the relay may have queued the mail): it is retried, with the same Message-ID.
"""

from __future__ import annotations

import os
import re
import smtplib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.settings import SettingsError
from gateway.transports import xdm
from gateway.transports.base import Outcome

__all__ = ["SmimeSigner", "SmtpSettings", "SmtpTransport", "mailbox_of", "message_id_header", "tls_context"]

_MAILBOX = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
BODY = (
    "Bonjour,\r\n\r\n"
    "Ce message sécurisé MSSanté est émis automatiquement par la passerelle de sortie d'hospitalisation.\r\n"
    "Son contenu structuré est dans la pièce jointe IHE_XDM.ZIP : {what}.\r\n"
    "Un accusé de traitement (MDN) est demandé.\r\n\r\n"
    "Merci de ne pas répondre à ce message : cette boîte applicative ne lit que les accusés.\r\n"
)


def mailbox_of(address: str) -> str:
    """The one mailbox of a ``mailto:`` endpoint (or a bare address); ValueError for anything else.

    Strict on purpose: header fields (``?subject=``), several recipients, display names or line
    breaks in a directory entry must never reach the mail headers.
    """
    value = address[len("mailto:") :] if address.lower().startswith("mailto:") else address
    value = unquote(value).strip()
    if not _MAILBOX.match(value) or ".." in value:
        raise ValueError(f"not a single mailbox: {address!r}")
    return value


def message_id_header(message_id: str, sender: str) -> str:
    """``<{MessageHeader.id}@{sender domain}>``: stable across retries, so MDNs and duplicates correlate."""
    return f"<{message_id}@{sender.rsplit('@', 1)[1].lower()}>"


def tls_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` (the IGC-Santé chain) and presenting the gateway's certificate.

    The certificate and key make it mutual TLS (the IGC-Santé software certificate of the BAL applicative).
    """
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"SMTP TLS files unusable: {exc}") from None
    return context


class SmimeSigner:
    """Signs a MIME entity as S/MIME ``multipart/signed`` (detached, SHA-256) with a certificate and its key."""

    def __init__(
        self,
        certificate: x509.Certificate,
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        chain: tuple[x509.Certificate, ...] = (),
    ) -> None:
        public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if certificate.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
            raise SettingsError("S/MIME certificate and key do not match")
        self.certificate, self.key, self.chain = certificate, key, chain

    @classmethod
    def from_files(cls, cert_file: Path, key_file: Path, password: bytes | None = None) -> SmimeSigner:
        """The signer certificate first in ``cert_file``, then its chain; the key in PEM (PKCS#8 or traditional)."""
        try:
            certificates = x509.load_pem_x509_certificates(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password)
        except (OSError, ValueError, TypeError) as exc:
            raise SettingsError(f"S/MIME certificate or key unusable: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise SettingsError("S/MIME key must be RSA or EC")
        return cls(certificates[0], key, tuple(certificates[1:]))

    def sign(self, entity: bytes) -> bytes:
        """``entity`` (CRLF lines) wrapped as ``multipart/signed``: MIME-Version and Content-Type headers, then body."""
        builder = pkcs7.PKCS7SignatureBuilder().set_data(entity).add_signer(self.certificate, self.key, hashes.SHA256())
        for certificate in self.chain:
            builder = builder.add_certificate(certificate)
        return builder.sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """How the gateway reaches its MSSanté operator's submission relay."""

    host: str
    sender: str  # the BAL applicative: From, envelope sender (→ Return-Path) and Disposition-Notification-To
    port: int = 587
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    require_starttls: bool = True  # refuse to send in clear; only a test relay may turn it off
    tls: ssl.SSLContext | None = None  # None: the system's trust store, no client certificate
    timeout: float = 30.0
    smime_cert_file: Path | None = None
    smime_key_file: Path | None = None
    xdm_source_id: str = xdm.DEFAULT_SOURCE_ID  # the OID naming this gateway as an XDM source
    local_hostname: str | None = None  # what EHLO says (default: this host's FQDN)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SmtpSettings | None:
        """``GATEWAY_SMTP_*`` / ``GATEWAY_SMIME_*`` variables; None when no relay (``GATEWAY_SMTP_HOST``) is set."""
        env = os.environ if environ is None else environ
        host = env.get("GATEWAY_SMTP_HOST")
        if not host:
            return None
        sender = env.get("GATEWAY_SMTP_SENDER", "")
        try:
            mailbox_of(sender)
        except ValueError:
            raise SettingsError("GATEWAY_SMTP_SENDER must be the gateway's MSSanté application mailbox") from None
        try:
            port = int(env.get("GATEWAY_SMTP_PORT", "587"))
            timeout = float(env.get("GATEWAY_SMTP_TIMEOUT", "30"))
        except ValueError:
            raise SettingsError("GATEWAY_SMTP_PORT and GATEWAY_SMTP_TIMEOUT must be numbers") from None
        password = env.get("GATEWAY_SMTP_PASSWORD")
        if env.get("GATEWAY_SMTP_PASSWORD_FILE"):
            try:
                password = Path(env["GATEWAY_SMTP_PASSWORD_FILE"]).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"GATEWAY_SMTP_PASSWORD_FILE: {exc.strerror}") from None

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        smime = path("GATEWAY_SMIME_CERT_FILE"), path("GATEWAY_SMIME_KEY_FILE")
        if (smime[0] is None) != (smime[1] is None):
            raise SettingsError("GATEWAY_SMIME_CERT_FILE and GATEWAY_SMIME_KEY_FILE go together")
        return cls(
            host=host,
            sender=sender,
            port=port,
            username=env.get("GATEWAY_SMTP_USERNAME") or None,
            password=password or None,
            require_starttls=env.get("GATEWAY_SMTP_REQUIRE_STARTTLS", "true").lower() not in ("0", "false", "no"),
            tls=tls_context(
                path("GATEWAY_SMTP_CA_FILE"), path("GATEWAY_SMTP_CERT_FILE"), path("GATEWAY_SMTP_KEY_FILE")
            ),
            timeout=timeout,
            smime_cert_file=smime[0],
            smime_key_file=smime[1],
            xdm_source_id=env.get("GATEWAY_XDM_SOURCE_ID", xdm.DEFAULT_SOURCE_ID),
        )


def _by_code(code: int, detail: str) -> Outcome:
    """SMTP reply classes (RFC 5321 §4.2.1): 4yz may succeed later, 5yz will not."""
    return Outcome("transient" if 400 <= code < 500 else "permanent", detail)


class _Refused(Exception):
    """An SMTP reply that ends the attempt (classified by its code)."""

    def __init__(self, step: str, code: int, text: bytes | str) -> None:
        reply = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        super().__init__(f"{step}: {code} {' '.join(reply.split())[:200]}")
        self.code = code


class SmtpTransport:
    """One SMTP session per message (a retry never reuses a half-broken session)."""

    def __init__(self, settings: SmtpSettings, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        try:
            self.sender = mailbox_of(settings.sender)
        except ValueError:
            raise SettingsError(f"SMTP sender {settings.sender!r} is not a mailbox") from None
        self.settings, self.clock = settings, clock
        self.context = settings.tls or tls_context()
        self.signer: SmimeSigner | None = None
        if settings.smime_cert_file is not None and settings.smime_key_file is not None:
            self.signer = SmimeSigner.from_files(settings.smime_cert_file, settings.smime_key_file)

    # -- the mail ------------------------------------------------------------------------------------
    def compose(self, payload: bytes, recipient: str, message_id: str) -> bytes:
        """The RFC 5322 mail (CRLF, 7-bit) for one message; raises :class:`~gateway.transports.xdm.XdmError`."""
        contents = xdm.read_message(payload)
        if contents.message_id != message_id:
            raise xdm.XdmError(f"payload is message {contents.message_id}, not {message_id}")
        archive = xdm.build_xdm(contents, source_id=self.settings.xdm_source_id, recipient=recipient)
        what = "message FHIR" + (" et document CDA d'origine" if contents.has_cda else "")
        entity = EmailMessage(policy=policy.SMTP)
        entity.set_content(BODY.format(what=what), subtype="plain", charset="utf-8", cte="quoted-printable")
        entity.add_attachment(archive, maintype="application", subtype="zip", filename=xdm.ZIP_NAME)
        for part in (entity, *entity.iter_parts()):
            del part["MIME-Version"]  # once, at the top of the mail (or of the signed entity)
        body = entity.as_bytes(policy=policy.SMTP)
        body = self.signer.sign(body) if self.signer is not None else b"MIME-Version: 1.0\r\n" + body

        head = EmailMessage(policy=policy.SMTP)
        head["From"] = self.sender
        head["To"] = recipient
        head["Subject"] = contents.title
        head["Date"] = format_datetime(self.clock())
        head["Message-ID"] = message_id_header(message_id, self.sender)
        head["Disposition-Notification-To"] = f"<{self.sender}>"
        if contents.cda_codes:
            head["X-MSS-CODECDA"] = ", ".join(contents.cda_codes)
        if contents.cda_has_ins:
            head["X-MSS-INS"] = "O"
        head["X-Gateway-Message-Id"] = message_id
        return head.as_bytes(policy=policy.SMTP).rstrip(b"\r\n") + b"\r\n" + body

    # -- the session ---------------------------------------------------------------------------------
    def send(self, payload: bytes, endpoint: str, message_id: str) -> Outcome:
        try:
            recipient = mailbox_of(endpoint)
        except ValueError as exc:
            return Outcome("permanent", str(exc))
        try:
            mail = self.compose(payload, recipient, message_id)
        except xdm.XdmError as exc:
            return Outcome("permanent", f"cannot build the MSSanté mail: {exc}")
        try:
            reply = self._submit(mail, recipient)
        except _Refused as exc:
            return _by_code(exc.code, str(exc))
        except ssl.SSLCertVerificationError as exc:
            return Outcome("permanent", f"SMTP server certificate not trusted: {exc.verify_message}")
        except smtplib.SMTPServerDisconnected as exc:
            return Outcome("transient", f"SMTP server disconnected: {exc}")
        except smtplib.SMTPNotSupportedError as exc:
            return Outcome("permanent", f"SMTP server does not support what is required: {exc}")
        except smtplib.SMTPResponseException as exc:  # HELO, STARTTLS, AUTH replies
            return _by_code(exc.smtp_code, str(_Refused("SMTP", exc.smtp_code, exc.smtp_error)))
        except TimeoutError:
            return Outcome("transient", "SMTP timeout")
        except (ssl.SSLError, OSError, smtplib.SMTPException) as exc:
            return Outcome("transient", f"SMTP connection failed: {type(exc).__name__}: {exc}")
        return Outcome("sent", f"accepted by {self.settings.host} for {recipient} ({reply}); awaiting MDN")

    def _submit(self, mail: bytes, recipient: str) -> str:
        settings = self.settings
        with smtplib.SMTP(settings.host, settings.port, settings.local_hostname, settings.timeout) as smtp:
            smtp.ehlo()
            if smtp.has_extn("starttls"):
                smtp.starttls(context=self.context)
                smtp.ehlo()
            elif settings.require_starttls:
                raise _Refused("STARTTLS", 530, "not offered by the server: refusing to send health data in clear")
            if settings.username:
                smtp.login(settings.username, settings.password or "")
            code, text = smtp.mail(self.sender)
            if code != 250:
                raise _Refused("MAIL FROM", code, text)
            code, text = smtp.rcpt(recipient)
            if code not in (250, 251):
                raise _Refused("RCPT TO", code, text)
            try:
                code, text = smtp.data(mail)
            except smtplib.SMTPDataError as exc:
                raise _Refused("DATA", exc.smtp_code, exc.smtp_error) from None
            if code != 250:
                raise _Refused("DATA", code, text)
            return f"{code} {' '.join(text.decode('utf-8', 'replace').split())[:120]}"

    def close(self) -> None:
        return None
