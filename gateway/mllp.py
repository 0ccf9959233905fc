"""The MLLP listener: HL7 v2 letters in over TCP, each answered with an HL7 ACK.

Frames are ``<VT> message <FS><CR>``; a connection may carry many messages, one at a time (the
sender waits for each ACK).  Each message goes through the same intake as ``POST /letters`` in a
worker thread, and AA is sent only once the letter is stored with its deliveries and audit; a
refusal is audited and answered AE or AR with an ERR segment saying why.  The same message sent again
is answered AA with the same letter id.

Over TLS (``tls``, :func:`server_tls_context`; IHE ATNA's secure node), the sender must present a client
certificate chained to the configured CAs (a handshake without one fails, and the log says why), and that
certificate must be mapped to the ``his`` role (``certificates``, the API's ``GATEWAY_CLIENT_CERTS``): the
TLS layer says the certificate is genuine, the mapping says it may send letters.  A genuine but unmapped
certificate gets one AR (ERR-8 says why) and the connection is closed; the refusal is audited and counted
like the API's 401s (:class:`~gateway.api.logins.RefusedLogins`), and nothing of the message is processed.
The certificate's fingerprint names the sender in the audit trail, beside MSH-4.

Bounded by construction: a frame over ``max_frame_bytes`` is refused and the connection closed
without reading the rest; a sender silent for ``idle_timeout`` seconds between messages, or slower
than ``read_timeout`` within one, is disconnected; at most ``max_connections`` connections and
``workers`` messages in progress at once.  Logs carry message types, control ids and outcomes, never
patient data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from os import PathLike
from typing import Any

from gateway.api.auth import certificate_name, fingerprint
from gateway.api.logins import RefusedLogins
from gateway.errors import DATABASE_UNAVAILABLE, GatewayError, database_failure
from gateway.ingest import hl7v2
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.settings import SettingsError, loopback

__all__ = ["MllpListener", "Peer", "his_certificates", "server_tls_context"]

HIS_ROLE = "his"

START, END = b"\x0b", b"\x1c\r"
log = logging.getLogger("gateway.mllp")


def server_tls_context(
    cert_file: str | PathLike[str], key_file: str | PathLike[str] | None, ca_file: str | PathLike[str]
) -> ssl.SSLContext:
    """The listener's TLS: our server certificate, TLS 1.2 at least, and a client certificate required and
    verified against ``ca_file`` (the CAs that sign the HIS's certificates)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except FileNotFoundError as exc:
        raise SettingsError(f"MLLP TLS: {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"MLLP TLS: cannot load the certificate, key or CA file: {exc}") from None
    return context


def his_certificates(certificates: Mapping[str, frozenset[str]]) -> None:
    """Refuse to serve MLLP over TLS when no client certificate may send letters (every sender would be refused)."""
    if not any(HIS_ROLE in roles for roles in certificates.values()):
        raise SettingsError(
            "MLLP over TLS takes letters only from client certificates mapped to the his role: "
            "list them in GATEWAY_CLIENT_CERTS (sha256-fingerprint:his)"
        )


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection: its address and, over TLS, its certificate's name
    (``cert-`` + fingerprint, as the API names certificate clients) and why it may not send, if it may not."""

    address: str = "unknown"
    certificate: str | None = None
    refusal: str | None = None

    def client(self, header: hl7v2.Header | None) -> str:
        """The audit trail's name for the sender: MSH-4 as the message says, and the certificate that proves it."""
        sender = f"mllp:{header.sender}" if header is not None else "mllp:unknown"
        return f"{sender} ({self.certificate})" if self.certificate else sender


class MllpListener:
    """An asyncio MLLP server feeding :class:`~gateway.intake.Intake`.

    ``senders``: the allowed sending facilities (MSH-4 namespace or universal id); None allows any.
    ``processing_ids``: the MSH-11 values taken (P for production; add T on a test platform).
    ``tls``: serve MLLP over TLS with this context (:func:`server_tls_context`); ``certificates`` then maps
    client certificate fingerprints to roles (only ``his`` may send), ``logins`` audits the refusals and
    ``metrics`` counts the failed handshakes (``gateway_mllp_tls_failures_total{kind}``).
    """

    def __init__(
        self,
        intake: Intake,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        max_document_bytes: int | None = None,
        max_frame_bytes: int | None = None,
        idle_timeout: float = 300.0,
        read_timeout: float = 30.0,
        max_connections: int = 32,
        workers: int = 4,
        senders: Iterable[str] | None = None,
        processing_ids: Iterable[str] = ("P",),
        tls: ssl.SSLContext | None = None,
        certificates: Mapping[str, frozenset[str]] | None = None,
        logins: RefusedLogins | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if tls is not None:
            his_certificates(certificates or {})
        self.intake = intake
        self.tls, self.certificates = tls, dict(certificates or {})
        self.logins = logins
        self.metrics = metrics
        if self.metrics is not None and tls is not None:
            for refused in (True, False):  # present at 0: increase() needs a first sample
                self.metrics.mllp_handshakes.labels("refused" if refused else "abandoned")
        self.host, self.port = host, port
        self.max_document_bytes = max_document_bytes or intake.settings.max_document_bytes
        # a base64 CDA of the maximum size is 4/3 of it; room on top for a PDF beside it (ORU^R01)
        self.max_frame_bytes = max_frame_bytes or 2 * self.max_document_bytes + 65536
        self.idle_timeout, self.read_timeout = idle_timeout, read_timeout
        self.max_connections = max_connections
        self.senders = frozenset(senders) if senders is not None else None
        self.processing_ids = tuple(processing_ids)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mllp")
        self._server: asyncio.Server | None = None
        self._connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- one message ---------------------------------------------------------------------------------
    def handle(self, raw: bytes, now: datetime | None = None, peer: Peer | None = None) -> bytes:
        """One message in, its ACK out (blocking: translation and the durable commit happen here)."""
        now = now or datetime.now(UTC)
        peer = peer or Peer()
        header: hl7v2.Header | None = None
        client = peer.client(None)
        if peer.refusal is not None:
            return self._refuse_peer(raw, peer, now)
        try:
            header = hl7v2.read_header(raw)
            client = peer.client(header)
            if self.senders is not None and header.facility not in self.senders:
                raise hl7v2.Hl7Refusal(
                    "this sending facility (MSH-4) is not allowed to send letters here",
                    ack="AR",
                    condition="103",
                    location="MSH^1^4",
                )
            message = hl7v2.read_message(raw, max_bytes=self.max_document_bytes, processing_ids=self.processing_ids)
            system_of = self._system_of

            def same_patient(prepared: Any) -> None:
                hl7v2.check_patient(message.patient_ids, prepared.patient_ids, system_of)

            # the sender bound to establishments: its certificate over TLS, else the facility MSH-4 claims
            sender = peer.certificate or f"mllp:{header.facility}"
            accepted = self.intake.accept(
                message.document, "application/hl7-cda+xml", client, now, check=same_patient, sender=sender
            )
        except GatewayError as error:
            answer = hl7v2.answer_for(error)
            try:
                self.intake.refuse(error, client, now)
            except Exception:  # the audit store away: the sender still gets its answer, and may resend
                log.exception("mllp: could not audit a refusal")
                answer = hl7v2.Answer("AR", "internal error: resend later", "207", retry=True)
            self._log(header, answer.code, answer.condition)
            return hl7v2.build_ack(header, answer, now=now)
        except DATABASE_UNAVAILABLE as error:  # nothing stored: the sender must resend later, as for a 503
            log.warning("mllp: database unavailable (%s): nothing stored", database_failure(error))
            answer = hl7v2.Answer(
                "AR", "the database is not available: the message was not stored; resend it later", "207", retry=True
            )
            self._log(header, "AR", "database unavailable")
            return hl7v2.build_ack(header, answer, now=now)
        except Exception:
            log.exception("mllp: internal error (control id %s)", header.control_id[:40] if header else "?")
            answer = hl7v2.answer_for(RuntimeError())
            return hl7v2.build_ack(header, answer, now=now)
        text = f"letter {accepted.letter_id} {'stored' if accepted.created else 'already stored'}"
        self._log(header, "AA", accepted.letter_id)
        return hl7v2.build_ack(header, hl7v2.Answer("AA", text), now=now)

    def _refuse_peer(self, raw: bytes, peer: Peer, now: datetime) -> bytes:
        """AR to a sender whose certificate may not send letters, audited as a refused authentication;
        only the header is read, to address the ACK."""
        try:
            header: hl7v2.Header | None = hl7v2.read_header(raw)
        except GatewayError:
            header = None
        why = peer.refusal or "not authorised"
        if self.logins is not None:
            what = f"MLLP {header.message_type[:3]}^{header.trigger[:3]}" if header else "MLLP"
            try:
                self.logins.record(what, peer.certificate or "anonymous", peer.address, "unknown-certificate", why)
            except Exception:  # the audit store away: the sender is refused all the same
                log.exception("mllp: could not audit a refused certificate")
        self._log(header, "AR", "client certificate not authorised")
        return hl7v2.build_ack(header, hl7v2.Answer("AR", why, "103"), now=now)

    def _peer(self, writer: asyncio.StreamWriter) -> Peer:
        """The connection's sender; over TLS, its certificate and whether it may send letters."""
        address = _address(writer)
        if self.tls is None:
            return Peer(address)
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:  # CERT_REQUIRED makes the handshake fail first; never let one through regardless
            return Peer(address, None, "a client certificate is required")
        print_ = fingerprint(der)
        name = certificate_name(print_)
        if HIS_ROLE not in self.certificates.get(print_, frozenset()):
            return Peer(address, name, f"client certificate {print_[:16]}… is not authorised to send letters here")
        return Peer(address, name)

    def _system_of(self, oid: str) -> str | None:
        entry = self.intake.mappings.codes.get("identifier-systems")
        found = entry.entries.get(oid) if entry is not None else None
        return str(found["system"]) if isinstance(found, dict) and "system" in found else None

    @staticmethod
    def _log(header: hl7v2.Header | None, code: str, detail: str) -> None:
        h = header or hl7v2.Header()
        log.info(
            "mllp %s^%s control id %s from %s: %s %s",
            h.message_type[:3],
            h.trigger[:3],
            h.control_id[:40],
            h.sender,
            code,
            detail,
        )

    # -- the connection loop -------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self.max_connections:
            log.warning("mllp: connection refused, %d already open", self._connections)
            writer.close()
            return
        self._connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self.tls is not None and not await self._handshake(writer):
                return
            peer = self._peer(writer)
            while await self._one(reader, writer, peer) and peer.refusal is None:
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections -= 1
            writer.close()
            try:  # over TLS, closing waits for the peer's close_notify: bounded, and cut short by stop()
                await asyncio.wait_for(writer.wait_closed(), self.read_timeout)
            except asyncio.CancelledError:  # stop(): the socket is closed all the same
                writer.transport.abort()
                raise
            except Exception:  # the peer never answered the close, or the connection broke
                writer.transport.abort()
            finally:
                if task is not None:
                    self._tasks.discard(task)  # only now: stop() cancels a connection still closing

    async def _handshake(self, writer: asyncio.StreamWriter) -> bool:
        """TLS on the accepted connection, here rather than in ``start_server``: asyncio drops a failed
        handshake silently, and the engineer wiring a HIS needs to read why it was refused."""
        assert self.tls is not None
        try:
            await asyncio.wait_for(writer.start_tls(self.tls), self.read_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            # a refused certificate or protocol is worth a warning; a peer that connected and left without
            # a word (a load balancer's TCP probe, a port scan) or stalled is only noted
            refused = isinstance(exc, ssl.SSLError)
            if self.metrics is not None:
                self.metrics.mllp_handshake_failed(refused)
            log.log(
                logging.WARNING if refused else logging.INFO,
                "mllp: TLS handshake with %s failed (%s): nothing read",
                _address(writer),
                (exc.reason if isinstance(exc, ssl.SSLError) else None) or type(exc).__name__,
            )
            return False
        return True

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> bool:
        """Read one frame, answer it; False when the connection should close."""
        skipped = 0
        while True:  # whitespace (or stray bytes) between frames, within reason
            first = await asyncio.wait_for(reader.read(1), self.idle_timeout)
            if not first:
                return False
            if first == START:
                break
            skipped += 1
            if skipped > 1024:
                log.warning("mllp: no frame start (VT) in 1 KiB: not an MLLP sender, closing")
                return False
        try:
            frame = await asyncio.wait_for(reader.readuntil(END), self.read_timeout)
        except asyncio.LimitOverrunError as overrun:
            head = await reader.read(min(overrun.consumed, 65536))  # enough for MSH; the rest is never read
            if peer.refusal is not None:  # a sender who may not send: refused as such, whatever the size
                loop = asyncio.get_running_loop()
                ack = await loop.run_in_executor(self._pool, self._refuse_peer, head, peer, datetime.now(UTC))
                writer.write(START + ack + END)
                await writer.drain()
                return False
            answer = hl7v2.Answer(
                "AE",
                f"message over the {self.max_frame_bytes}-byte frame limit: not read; the connection is closed",
                "104",
            )
            try:
                header: hl7v2.Header | None = hl7v2.read_header(head)
            except GatewayError:
                header = None
            loop = asyncio.get_running_loop()
            refusal = hl7v2.Hl7Refusal(answer.text, condition="104")
            client = peer.client(header)
            with contextlib.suppress(Exception):
                await loop.run_in_executor(self._pool, self.intake.refuse, refusal, client, datetime.now(UTC))
            self._log(header, "AE", "frame too large")
            writer.write(START + hl7v2.build_ack(header, answer) + END)
            await writer.drain()
            return False
        except asyncio.IncompleteReadError:
            return False  # the sender hung up mid-frame: nothing was processed
        loop = asyncio.get_running_loop()
        ack = await loop.run_in_executor(self._pool, self.handle, frame[: -len(END)], None, peer)
        writer.write(START + ack + END)
        await writer.drain()
        return True

    # -- running -------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Listen (on the event loop running now); the port bound (useful with port 0)."""
        loop = asyncio.get_running_loop()
        limit, held = self.max_frame_bytes + len(END), self.tls is not None

        def connection() -> asyncio.StreamReaderProtocol:  # what asyncio.start_server builds, held for TLS
            return _Held(asyncio.StreamReader(limit=limit, loop=loop), self._serve, held=held)

        self._server = await loop.create_server(connection, self.host, self.port)
        port = int(self._server.sockets[0].getsockname()[1])
        if self.tls is not None:
            log.info("mllp: listening on %s:%d over TLS, client certificates required", self.host, port)
        elif loopback(self.host):
            log.info("mllp: listening on %s:%d", self.host, port)
        else:
            log.warning(
                "mllp: listening on %s:%d WITHOUT TLS: letters cross the network in clear and senders are "
                "not authenticated; set GATEWAY_MLLP_TLS=client-cert",
                self.host,
                port,
            )
        return port

    async def stop(self) -> None:
        """Stop listening and drop the open connections (a message in a worker thread still finishes:
        its sender, without an ACK, will resend and get the same letter)."""
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def start_in_thread(self) -> int:
        """Run on an event loop of its own in a daemon thread (beside uvicorn); the port bound."""
        ready = threading.Event()
        bound: list[int] = []
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                bound.append(loop.run_until_complete(self.start()))
            except BaseException as exc:  # the port taken, say: reported to the caller
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
                loop.run_until_complete(self.stop())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="mllp", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        return bound[0]

    def close(self) -> None:
        """Stop a listener started with :meth:`start_in_thread` and its worker threads."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.logins is not None:
            self.logins.flush()  # the refusals only counted so far


def _address(writer: asyncio.StreamWriter) -> str:
    """The peer's IP address, as the log and the audit name it."""
    where = writer.get_extra_info("peername")
    return str(where[0]) if isinstance(where, tuple) and where else "unknown"


class _Held(asyncio.StreamReaderProtocol):
    """A stream connection that, when ``held``, reads nothing until :meth:`MllpListener._handshake` starts TLS
    on it: the client's first bytes (its ClientHello) must reach the TLS layer, not the stream's buffer."""

    def __init__(self, reader: asyncio.StreamReader, connected: Any, *, held: bool) -> None:
        super().__init__(reader, connected)
        self._held = held

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._held and isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()  # start_tls resumes it, for the TLS protocol
        super().connection_made(transport)
