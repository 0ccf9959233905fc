"""MDN acknowledgements (RFC 8098) for MSSanté deliveries: read them, apply them to the outbox.

An MSSanté delivery is ``sent`` once the relay accepted the mail; the recipient's software answers
later with a Message Disposition Notification (``multipart/report;
report-type=disposition-notification``) whose machine part names our mail (``Original-Message-ID:
<{MessageHeader.id}@{our domain}>``), the mailbox that handled it (``Final-Recipient``) and what
happened (``Disposition``).  ``processed`` / ``displayed`` / ``dispatched`` acknowledge the delivery;
an ``/error`` modifier (ANS: ``processed/Error: code^libellé``), ``deleted`` or ``failed``
dead-letter it with the error text.  The MDN must come from the mailbox the message was sent to.

A bounce — a Delivery Status Notification (RFC 3464, ``multipart/report;
report-type=delivery-status``) whose ``Action`` is ``failed`` for our mailbox — dead-letters the
delivery at once with its ``Status`` and ``Diagnostic-Code`` (an unknown MSSanté mailbox, a full
box), instead of leaving it to wait for a receipt that will never come; ``delayed``, ``delivered``
and ``relayed`` notices change nothing (the relay keeps trying; the MDN will follow).  The bounced
message is recognised by the headers the DSN returns (its ``Message-ID``).

Mail is outside input: nothing here raises on a malformed, hostile or unrelated mail — every mail
gets an :class:`MdnResult` (``refused`` with the reason, or ``ignored`` for mail that is not an MDN,
or an MDN for no delivery awaiting one: duplicates change nothing).  :class:`MdnInbox` is an
aiosmtpd handler for the application mailbox (the operator relays it to the gateway) and
:func:`start_inbox` runs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import os
import re
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import Message
from email.parser import BytesParser, HeaderParser
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.audit import acknowledgement_event
from gateway.logs import get_logger
from gateway.outbox import UNACKNOWLEDGED, Outbox
from gateway.settings import SettingsError
from gateway.transports.http import tls_context
from gateway.transports.mssante import SmtpSettings, mailbox_of

__all__ = [
    "ImapSettings",
    "MailboxError",
    "Mdn",
    "MdnInbox",
    "MdnMailbox",
    "MdnResult",
    "NotAnMdn",
    "apply_mdn",
    "imap_folder",
    "inbox_from_env",
    "mailbox_from_env",
    "parse_mdn",
    "start_inbox",
]

log = get_logger("gateway.mdn")

MAX_BYTES = 64 * 1024 * 1024  # an MDN may return the original mail (the XDM archive) in its third part
POSITIVE = frozenset({"processed", "displayed", "dispatched"})
NEGATIVE = frozenset({"deleted", "failed"})
_MSG_ID = re.compile(r"^\s*<([^<>@\s]+)@([^<>@\s]+)>\s*$")
_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


class NotAnMdn(Exception):
    """A mail that is no disposition notification at all (ignored) — as opposed to a malformed one."""


class MalformedMdn(Exception):
    """A disposition notification that cannot be trusted or understood (refused, with the reason)."""


@dataclass(frozen=True, slots=True)
class Mdn:
    message_id: str  # our MessageHeader.id, from Original-Message-ID
    domain: str  # the Message-ID's domain (ours)
    recipients: tuple[str, ...]  # Final-Recipient, then Original-Recipient (mailboxes)
    disposition: str  # the Disposition field as received
    ok: bool
    detail: str
    kind: Literal["MDN", "DSN"] = "MDN"  # a disposition notification, or a bounce


@dataclass(frozen=True, slots=True)
class MdnResult:
    """What one incoming mail did: ``acknowledged`` / ``dead-lettered`` (applied), ``ignored``, ``refused``."""

    status: Literal["acknowledged", "dead-lettered", "ignored", "refused"]
    detail: str
    message_id: str | None = None
    ours: bool = False  # it answers a message this outbox sent (a duplicate receipt included)


def _clean(text: str, limit: int = 300) -> str:
    return _PRINTABLE.sub(" ", " ".join(text.split()))[:limit]


def _fields(part: Message) -> Message:
    """The header-style fields of a ``message/*`` part (the email package parses them as a sub-message)."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    if isinstance(payload, str):
        return HeaderParser(policy=policy.compat32).parsestr(payload)
    raise MalformedMdn(f"unreadable {part.get_content_type()} part")


def _address(value: str | None) -> str | None:
    """``rfc822; someone@domain`` → ``someone@domain`` (None when absent or not a mailbox)."""
    if not value:
        return None
    _, _, address = str(value).rpartition(";")
    try:
        return mailbox_of(address.strip()).lower()
    except ValueError:
        return None


def _original_id(machine: Message, parts: Iterable[Message]) -> str:
    value = machine.get("Original-Message-ID")
    if value:
        return str(value)
    for part in parts:  # RFC 8098 makes it a SHOULD: fall back on the returned original's headers
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            original = _fields(part)
            if original.get("Message-ID"):
                return str(original["Message-ID"])
    raise MalformedMdn("no Original-Message-ID (and no returned original Message-ID)")


def _disposition(value: str, machine: Message) -> tuple[bool, str]:
    """(positive?, detail) from ``action-mode/sending-mode; type[/modifier]`` and any ``Error:`` fields."""
    _, semicolon, rest = value.partition(";")
    if not semicolon or not rest.strip():
        raise MalformedMdn(f"Disposition without a disposition type: {_clean(value, 80)!r}")
    kind, _, modifier = rest.strip().partition("/")
    kind = kind.strip().lower()
    errors = [_clean(str(v)) for v in machine.get_all("Error", []) + machine.get_all("Failure", [])]
    flagged = modifier.strip().lower().startswith("error")
    if flagged and _clean(modifier.partition(":")[2]):
        errors.insert(0, _clean(modifier.partition(":")[2]))
    if kind in POSITIVE and not flagged and not errors:
        return True, kind
    if kind in POSITIVE or kind in NEGATIVE:
        return False, f"{kind}: {'; '.join(e for e in errors if e) or 'no error text'}"
    raise MalformedMdn(f"unknown disposition type {kind[:40]!r}")


def parse_mdn(raw: bytes) -> Mdn:
    """The MDN in ``raw``; :class:`NotAnMdn` for other mail, :class:`MalformedMdn` for a broken MDN."""
    if len(raw) > MAX_BYTES:
        raise MalformedMdn(f"mail over {MAX_BYTES} bytes")
    try:
        mail = BytesParser(policy=policy.compat32).parsebytes(raw)
    except Exception as exc:  # the email package's errors are not a closed set; outside input must not crash us
        raise MalformedMdn(f"unparseable mail: {type(exc).__name__}") from None
    if mail.get_content_type() != "multipart/report":
        raise NotAnMdn(f"a {mail.get_content_type()} mail, not a report")
    report_type = str(mail.get_param("report-type", "") or "").lower()
    if report_type not in ("disposition-notification", "delivery-status"):
        raise NotAnMdn(f"a {report_type or 'untyped'} report, not a disposition or delivery status notification")
    payload = mail.get_payload()
    parts = [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []
    if not parts:
        raise MalformedMdn("multipart/report without parts")
    if report_type == "delivery-status":
        return _bounce(parts)
    machine_part = next((p for p in parts if p.get_content_type() == "message/disposition-notification"), None)
    if machine_part is None:
        raise MalformedMdn("no message/disposition-notification part")
    machine = _fields(machine_part)
    original = _original_id(machine, parts)
    match = _MSG_ID.match(original)
    if match is None:
        raise MalformedMdn(f"Original-Message-ID is not <id@domain>: {_clean(original, 80)!r}")
    disposition = machine.get("Disposition")
    if not disposition:
        raise MalformedMdn("no Disposition field")
    recipients = tuple(
        a for a in (_address(machine.get("Final-Recipient")), _address(machine.get("Original-Recipient"))) if a
    )
    if not recipients:
        raise MalformedMdn("no Final-Recipient mailbox")
    ok, detail = _disposition(str(disposition), machine)
    return Mdn(match.group(1), match.group(2).lower(), recipients, _clean(str(disposition)), ok, detail)


def _status_groups(part: Message) -> list[Message]:
    """The field groups of a ``message/delivery-status`` part: per message, then one per recipient."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [g for g in payload if isinstance(g, Message)]
    if isinstance(payload, str):
        blocks = [b for b in re.split(r"\r?\n\s*\r?\n", payload.strip()) if b.strip()]
        return [HeaderParser(policy=policy.compat32).parsestr(b) for b in blocks]
    raise MalformedMdn("unreadable message/delivery-status part")


def _bounce(parts: list[Message]) -> Mdn:
    """A DSN: a negative acknowledgement when delivery ``failed`` for a recipient; other actions are
    notices (:class:`NotAnMdn`, ignored).  The message is named by the returned original's Message-ID."""
    status_part = next((p for p in parts if p.get_content_type() == "message/delivery-status"), None)
    if status_part is None:
        raise MalformedMdn("no message/delivery-status part")
    groups = _status_groups(status_part)[1:]  # the first group is about the message, not a recipient
    failed = [g for g in groups if str(g.get("Action", "")).strip().lower() == "failed"]
    if not failed:
        actions = sorted({_clean(str(g.get("Action", "none")), 20).lower() for g in groups}) or ["none"]
        raise NotAnMdn(f"a delivery status notification ({', '.join(actions)}): nothing to apply")
    recipients = tuple(
        a for g in failed for a in (_address(g.get("Final-Recipient")), _address(g.get("Original-Recipient"))) if a
    )
    if not recipients:
        raise MalformedMdn("a failed delivery status without a Final-Recipient mailbox")
    original = next(
        (
            str(_fields(p)["Message-ID"])
            for p in parts
            if p.get_content_type() in ("message/rfc822", "text/rfc822-headers") and _fields(p).get("Message-ID")
        ),
        None,
    )
    if original is None:
        raise MalformedMdn("a bounce that returns no Message-ID of the bounced mail")
    match = _MSG_ID.match(original)
    if match is None:
        raise MalformedMdn(f"the bounced Message-ID is not <id@domain>: {_clean(original, 80)!r}")
    first = failed[0]
    status = _clean(str(first.get("Status", "")), 20)
    diagnostic = _clean(
        str(first.get("Diagnostic-Code", "")).partition(";")[2] or str(first.get("Diagnostic-Code", ""))
    )
    detail = f"bounced ({status or 'no status'}): {diagnostic or 'no diagnostic'}"
    return Mdn(match.group(1), match.group(2).lower(), recipients, f"failed {status}".strip(), False, detail, "DSN")


def apply_mdn(outbox: Outbox, raw: bytes, now: datetime, *, domain: str | None = None) -> MdnResult:
    """Parse one incoming mail and acknowledge (or dead-letter) the delivery it answers, with an audit event.

    ``domain`` (the gateway's mailbox domain) makes MDNs for other senders' Message-IDs ``ignored``.
    """
    try:
        mdn = parse_mdn(raw)
    except NotAnMdn as exc:
        return MdnResult("ignored", f"not an MDN: {exc}")
    except MalformedMdn as exc:
        return MdnResult("refused", f"malformed MDN: {exc}")
    if domain is not None and mdn.domain != domain.lower():
        return MdnResult("ignored", f"MDN for a message of another domain ({mdn.domain})", mdn.message_id)
    delivery = outbox.delivery(mdn.message_id)
    given_up = (
        delivery is not None
        and delivery.status == "dead-lettered"
        and (delivery.last_error or "").startswith(UNACKNOWLEDGED)
    )  # the wait for this receipt had timed out: it still proves the delivery
    if delivery is None or not (delivery.status == "sent" or given_up):
        detail = "no delivery awaits an acknowledgement for this message"
        return MdnResult("ignored", detail, mdn.message_id, ours=delivery is not None)
    try:
        sent_to = mailbox_of(delivery.endpoint).lower()
    except ValueError:
        sent_to = delivery.endpoint.lower()
    if sent_to not in mdn.recipients:
        return MdnResult(
            "refused", f"MDN from {', '.join(mdn.recipients)} for a message sent to {sent_to}", mdn.message_id
        )
    event = acknowledgement_event(
        mdn.message_id,
        mdn.ok,
        f"{mdn.kind} {mdn.disposition}",
        delivery.recipient_ref,
        now.isoformat(timespec="seconds"),
    )
    if not outbox.acknowledge(mdn.message_id, mdn.ok, now, detail=f"{mdn.kind}: {mdn.detail}", audit_events=[event]):
        return MdnResult("ignored", "already acknowledged", mdn.message_id, ours=True)
    return MdnResult("acknowledged" if mdn.ok else "dead-lettered", mdn.detail, mdn.message_id, ours=True)


class MdnInbox:
    """aiosmtpd handler for the gateway's application mailbox: every mail goes through :func:`apply_mdn`.

    Malformed MDNs are refused at the SMTP level (``550 5.6.0`` with the reason, so the far end's
    operator sees it); other mail is accepted and ignored.  ``mailboxes`` limits the accepted
    recipients (the application mailbox); the last results are kept for operators and tests.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        domain: str | None = None,
        mailboxes: Iterable[str] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        keep: int = 1000,
    ) -> None:
        self.outbox, self.domain, self.clock = outbox, domain, clock
        self.mailboxes = frozenset(m.lower() for m in mailboxes)
        self.results: deque[MdnResult] = deque(maxlen=keep)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.mailboxes and address.lower() not in self.mailboxes:
            return "550 5.1.1 mailbox unknown: this server only takes acknowledgements for the gateway"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        now = self.clock()
        try:
            result = await asyncio.to_thread(apply_mdn, self.outbox, raw, now, domain=self.domain)
        except Exception as exc:  # e.g. the database is down: the sender's relay must keep the MDN and retry
            log.exception("MDN not applied")
            return f"451 4.3.0 acknowledgement not recorded, try again later ({type(exc).__name__})"
        self.results.append(result)
        # the detail's kind only: it quotes the mail (a Disposition text, a header) the sender wrote
        log.info(
            "MDN", outcome=result.status, message_id=result.message_id, detail_kind=result.detail.split(":")[0][:60]
        )
        if result.status == "refused":
            return f"550 5.6.0 {_clean(result.detail, 400)}"
        return f"250 2.0.0 {result.status}: {_clean(result.detail, 400)}"


def start_inbox(
    outbox: Outbox,
    host: str,
    port: int,
    tls_context: ssl.SSLContext | None = None,
    *,
    domain: str | None = None,
    mailboxes: Iterable[str] = (),
) -> Controller:
    """Run an :class:`MdnInbox` SMTP server in a background thread (``controller.stop()`` ends it).

    With a TLS context the server offers STARTTLS and requires it before any mail (make the context
    ``verify_mode = CERT_REQUIRED`` with the operator's CA for mutual TLS).
    """
    handler = MdnInbox(outbox, domain=domain, mailboxes=mailboxes)
    controller = Controller(
        handler,
        hostname=host,
        port=port,
        tls_context=tls_context,
        require_starttls=tls_context is not None,
        data_size_limit=MAX_BYTES,
    )
    controller.start()
    return controller


def inbox_from_env(outbox: Outbox, sender: str, environ: Mapping[str, str] | None = None) -> Controller | None:
    """The inbox ``gateway serve`` runs when ``GATEWAY_MDN_LISTEN=host:port`` is set (None otherwise).

    ``sender`` is the application mailbox (``GATEWAY_SMTP_SENDER``): the only accepted recipient, and
    its domain the only Message-ID domain acknowledged.  STARTTLS with ``GATEWAY_MDN_TLS_CERT_FILE`` /
    ``GATEWAY_MDN_TLS_KEY_FILE`` is required unless the inbox listens on loopback only;
    ``GATEWAY_MDN_CLIENT_CA_FILE`` also requires the relay's client certificate (mutual TLS).
    """
    env = os.environ if environ is None else environ
    listen = env.get("GATEWAY_MDN_LISTEN")
    if not listen:
        return None
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        raise SettingsError("GATEWAY_MDN_LISTEN must be host:port")
    cert, key, client_ca = (env.get(f"GATEWAY_MDN_{n}") for n in ("TLS_CERT_FILE", "TLS_KEY_FILE", "CLIENT_CA_FILE"))
    context = None
    if cert and key:
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            if client_ca:
                context.load_verify_locations(client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"GATEWAY_MDN_TLS_*: {exc}") from None
    elif host not in ("127.0.0.1", "::1", "localhost"):
        raise SettingsError(
            "GATEWAY_MDN_LISTEN off loopback needs GATEWAY_MDN_TLS_CERT_FILE and GATEWAY_MDN_TLS_KEY_FILE"
        )
    mailbox = mailbox_of(sender)
    return start_inbox(outbox, host, int(port_text), context, domain=mailbox.rsplit("@", 1)[1], mailboxes=[mailbox])


# -- the application mailbox over IMAP: how an MSSanté operator hands receipts to an application ---------
_IMAP_SCHEMES = {"imap": 143, "imaps": 993}


class MailboxError(Exception):
    """The IMAP server refused a step (login, select, fetch...): the poll stops, the mail stays."""


@dataclass(frozen=True)
class ImapSettings:
    """Where the gateway's application mailbox (BAL applicative) is read.

    ``imap`` upgrades the connection with STARTTLS (refusing a server that does not offer it), ``imaps``
    is TLS from the first byte; either way the server's certificate is checked against ``tls``.  With a
    ``password`` the mailbox logs in (``LOGIN``); without one it authenticates with the client certificate
    of ``tls`` (SASL ``EXTERNAL``, the IGC-Santé software certificate of an MSSanté application mailbox).
    """

    host: str
    username: str
    port: int = 143
    implicit_tls: bool = False
    folder: str = "INBOX"
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None  # None: the system's trust store, no client certificate
    done_folder: str | None = None  # None: a receipt, once applied, is deleted (it returns the letter)
    every: float = 30.0
    timeout: float = 30.0

    @classmethod
    def from_env(cls, smtp: SmtpSettings, environ: Mapping[str, str] | None = None) -> ImapSettings | None:
        """``GATEWAY_MDN_IMAP_URL`` (``imap://host[:143]/FOLDER`` or ``imaps://host[:993]/FOLDER``); the
        account, password, trusted CAs and client certificate default to the SMTP relay's (one application
        mailbox, one certificate), overridden by ``GATEWAY_MDN_IMAP_USERNAME``, ``_PASSWORD[_FILE]`` and
        ``_CA_FILE`` / ``_CERT_FILE`` / ``_KEY_FILE`` (together).  None when no URL is set."""
        env = os.environ if environ is None else environ
        url = env.get("GATEWAY_MDN_IMAP_URL")
        if not url:
            return None
        parts = urlsplit(url)
        try:
            port = parts.port or _IMAP_SCHEMES.get(parts.scheme, 0)
        except ValueError:
            port = 0
        if parts.scheme not in _IMAP_SCHEMES or not parts.hostname or not port or parts.username or parts.query:
            raise SettingsError(
                "GATEWAY_MDN_IMAP_URL must be imap://host[:port][/folder] (STARTTLS) or imaps://host[:port][/folder]"
            )

        password = env.get("GATEWAY_MDN_IMAP_PASSWORD") or smtp.password
        if env.get("GATEWAY_MDN_IMAP_PASSWORD_FILE"):
            try:
                password = Path(env["GATEWAY_MDN_IMAP_PASSWORD_FILE"]).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"GATEWAY_MDN_IMAP_PASSWORD_FILE: {exc.strerror}") from None
        own = [env.get(f"GATEWAY_MDN_IMAP_{n}_FILE") or None for n in ("CA", "CERT", "KEY")]
        if not password and not (own[1] or env.get("GATEWAY_SMTP_CERT_FILE")):
            raise SettingsError(
                "GATEWAY_MDN_IMAP_URL: the mailbox needs a password (GATEWAY_MDN_IMAP_PASSWORD_FILE, or the SMTP "
                "relay's) or a client certificate (GATEWAY_MDN_IMAP_CERT_FILE, or the SMTP relay's)"
            )
        try:
            every = float(env.get("GATEWAY_MDN_IMAP_POLL_SECONDS", "30"))
        except ValueError:
            every = -1.0
        if not 1.0 <= every <= 3600.0:
            raise SettingsError("GATEWAY_MDN_IMAP_POLL_SECONDS must be a number of seconds from 1 to 3600")
        return cls(
            host=parts.hostname,
            port=port,
            implicit_tls=parts.scheme == "imaps",
            folder=unquote(parts.path.strip("/")) or "INBOX",
            username=env.get("GATEWAY_MDN_IMAP_USERNAME") or smtp.username or mailbox_of(smtp.sender),
            password=password or None,
            tls=tls_context(*own) if any(own) else smtp.tls,  # the relay's trust and certificate by default
            done_folder=env.get("GATEWAY_MDN_IMAP_DONE_FOLDER") or None,
            every=every,
            timeout=smtp.timeout,
        )


def imap_folder(name: str) -> str:
    """A folder name as IMAP writes it: modified UTF-7 (RFC 3501 §5.1.3: ``Accusés`` is ``Accus&AOk-s``),
    then quoted (§4.3: it may hold spaces)."""
    if any(c in name for c in "\r\n\0"):
        raise SettingsError(f"an IMAP folder name cannot hold line breaks: {name!r}")
    encoded, pending = [], ""
    for char in name + "\x00":  # the sentinel flushes the last run of other characters
        if "\x20" <= char <= "\x7e" or char == "\x00":
            if pending:
                wide = base64.b64encode(pending.encode("utf-16-be")).decode("ascii").rstrip("=")
                encoded.append("&" + wide.replace("/", ",") + "-")
                pending = ""
            if char != "\x00":
                encoded.append("&-" if char == "&" else char)
        else:
            pending += char
    text = "".join(encoded)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ok(answer: tuple[str, Any], step: str) -> list[Any]:
    kind, data = answer[0], list(answer[1]) if isinstance(answer[1], list) else [answer[1]]
    if kind != "OK":
        said = b" ".join(d for d in data if isinstance(d, bytes)).decode("ascii", "replace")
        raise MailboxError(f"IMAP {step}: {kind} {_clean(said, 200)}")
    return data


def _shut(imap: imaplib.IMAP4) -> None:
    """Close a connection that failed half-way (its socket may be gone already): the first error is the one to report."""
    with contextlib.suppress(OSError, imaplib.IMAP4.error):
        imap.shutdown()


class MdnMailbox:
    """Reads the application mailbox over IMAP and applies every receipt in it (:func:`apply_mdn`).

    An MSSanté operator does not relay mail to the gateway: its application reads its mailbox.  Each
    poll takes the mail that arrived since the last one, oldest first.  A receipt for one of this
    gateway's messages (an MDN or a bounce, whatever it did: acknowledged, dead-lettered, a duplicate) is
    deleted — or moved to ``done_folder`` — only once its outcome is committed, so a crash in between
    reads it again, and a receipt applied twice changes nothing.  A mail that is no receipt, a receipt
    refused (malformed, or from another mailbox than the one the message went to) and a receipt for a
    message this gateway does not know (a shared mailbox) stay in the mailbox for a person to read; a
    failure of the database or of the server stops the poll and leaves the mail for the next one.
    """

    def __init__(
        self,
        outbox: Outbox,
        settings: ImapSettings,
        *,
        domain: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        batch: int = 200,
    ) -> None:
        self.outbox, self.settings, self.domain, self.clock, self.batch = outbox, settings, domain, clock, batch
        self._seen: tuple[int, int] = (0, 0)  # (UIDVALIDITY, last UID looked at): nothing before it again
        self._stop = threading.Event()
        outbox.metrics.mailbox_watched()

    def _connect(self) -> imaplib.IMAP4:
        s = self.settings
        context = s.tls or ssl.create_default_context()
        if s.implicit_tls:
            imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(s.host, s.port, ssl_context=context, timeout=s.timeout)
        else:
            imap = imaplib.IMAP4(s.host, s.port, timeout=s.timeout)
            try:
                if "STARTTLS" not in imap.capabilities:
                    raise MailboxError("IMAP: the server does not offer STARTTLS; the mailbox is never read in clear")
                _ok(imap.starttls(ssl_context=context), "STARTTLS")
            except BaseException:
                _shut(imap)
                raise
        how = "LOGIN" if s.password is not None else "AUTHENTICATE EXTERNAL"
        try:
            if s.password is not None:
                _ok(imap.login(s.username, s.password), how)
            else:  # the client certificate is the identity (SASL EXTERNAL, RFC 4422 appendix A): an empty
                # response asks for no other authorisation identity than the certificate's
                _ok(imap.authenticate("EXTERNAL", lambda _challenge: b""), how)
        except imaplib.IMAP4.error as exc:
            _shut(imap)
            said = exc.args[0] if exc.args else ""
            said = said.decode("ascii", "replace") if isinstance(said, bytes) else str(said)
            raise MailboxError(f"IMAP {how} as {s.username}: {_clean(said, 200)}") from None
        except BaseException:
            _shut(imap)
            raise
        return imap

    def poll_once(self) -> list[MdnResult]:
        """Read and apply what arrived since the last poll; what each mail did (counted in the metrics,
        as a failed read is: ``gateway_mailbox_reads``)."""
        try:
            results = self._poll()
        except BaseException:
            self.outbox.metrics.mailbox_read(False)
            raise
        self.outbox.metrics.mailbox_read(True, (r.status for r in results))
        return results

    def _poll(self) -> list[MdnResult]:
        results: list[MdnResult] = []
        imap = self._connect()
        try:
            _ok(imap.select(imap_folder(self.settings.folder)), f"SELECT {self.settings.folder}")
            stated = [v for v in imap.response("UIDVALIDITY")[1] if isinstance(v, bytes) and v.strip().isdigit()]
            validity_no = int(stated[-1]) if stated else 0  # RFC 3501 requires it; 0 if omitted
            last = self._seen[1] if self._seen[0] == validity_no else 0  # a rebuilt mailbox: read it all again
            found = _ok(imap.uid("SEARCH", f"UID {last + 1}:*"), "SEARCH")
            uids = sorted(int(u) for u in b" ".join(found).split() if int(u) > last)[: self.batch]
            done: list[int] = []
            for uid in uids:
                result = self._one(imap, uid)
                if result is not None:
                    results.append(result)
                    if self._ours(result):
                        done.append(uid)  # a receipt, applied (or applied before): it has done its work
                self._seen = (validity_no, uid)
            if done:
                self._file(imap, done)
        finally:
            with contextlib.suppress(Exception):
                imap.logout()
        return results

    def _ours(self, result: MdnResult) -> bool:
        """A receipt this gateway has applied, now or before — never one for another sender's message (a
        mailbox may be shared): that one, like a refused receipt or a mail that is none, stays."""
        return result.ours and result.status != "refused"

    def _one(self, imap: imaplib.IMAP4, uid: int) -> MdnResult | None:
        """Apply one mail (None: too large to be a receipt, left alone).  A database failure raises."""
        sized = _ok(imap.uid("FETCH", str(uid), "(RFC822.SIZE)"), "FETCH")
        size = re.search(rb"RFC822\.SIZE (\d+)", b" ".join(d for d in sized if isinstance(d, bytes)))
        if size is not None and int(size.group(1)) > MAX_BYTES:
            log.warning("mailbox: a mail over the size limit is left unread", uid=uid, size=int(size.group(1)))
            return None
        fetched = _ok(imap.uid("FETCH", str(uid), "(BODY.PEEK[])"), "FETCH")  # PEEK: \Seen stays for people
        raw = next((d[1] for d in fetched if isinstance(d, tuple) and len(d) == 2), None)
        if raw is None:  # expunged meanwhile by someone else
            return None
        result = apply_mdn(self.outbox, raw, self.clock(), domain=self.domain)
        log.info(
            "MDN",
            source="imap",
            outcome=result.status,
            message_id=result.message_id,
            detail_kind=result.detail.split(":")[0][:60],
        )
        return result

    def _file(self, imap: imaplib.IMAP4, uids: list[int]) -> None:
        """Move the applied receipts to the done folder, or delete them (an MDN returns the letter sent)."""
        which = ",".join(map(str, uids))
        target = self.settings.done_folder
        if target is not None and "MOVE" in imap.capabilities:
            _ok(imap.uid("MOVE", which, imap_folder(target)), f"MOVE to {target}")
            return
        if target is not None:
            _ok(imap.uid("COPY", which, imap_folder(target)), f"COPY to {target}")
        _ok(imap.uid("STORE", which, "+FLAGS.SILENT", "(\\Deleted)"), "STORE")
        if "UIDPLUS" in imap.capabilities:
            _ok(imap.uid("EXPUNGE", which), "EXPUNGE")
        else:
            _ok(imap.expunge(), "EXPUNGE")

    def run_forever(self) -> None:
        """Poll every ``settings.every`` seconds until :meth:`stop`; a failed poll is logged and tried
        again later, waiting longer after each failure in a row (up to ten minutes)."""
        failures = 0
        while not self._stop.is_set():
            try:
                self.poll_once()
                failures = 0
            except Exception as exc:  # the server or the database away: the mail waits in the mailbox
                failures += 1
                log.warning("mailbox not read", error=_clean(str(exc), 200), kind=type(exc).__name__)
            self._stop.wait(min(600.0, self.settings.every * 2 ** min(failures, 5)))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="mdn-mailbox", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def mailbox_from_env(outbox: Outbox, smtp: SmtpSettings, environ: Mapping[str, str] | None = None) -> MdnMailbox | None:
    """The mailbox poller ``gateway serve`` runs when ``GATEWAY_MDN_IMAP_URL`` is set (None otherwise):
    receipts for Message-IDs of the sender's domain only."""
    settings = ImapSettings.from_env(smtp, environ)
    if settings is None:
        return None
    return MdnMailbox(outbox, settings, domain=mailbox_of(smtp.sender).rsplit("@", 1)[1])
