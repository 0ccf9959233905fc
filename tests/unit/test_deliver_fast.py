"""The delivery path's fast forms behave as the plain ones did (bench/bench_deliver.py measures them).

- ``package.message`` and ``audit.disclosure_event`` give the same bytes as their reference forms (kept
  below as they were) on every dispatch scenario;
- ``Outbox.finish_many`` records a batch with one UPDATE per distinct outcome: each row only while this
  worker holds its claim, a delivery twice in a batch recorded once, the audit chained and verifiable;
- ``Outbox.claim`` by letters (statements built once per letter count) takes exactly those letters' queued
  deliveries, up to its limit;
- ``HttpTransport`` puts on the wire exactly what ``httpx.Request`` + ``httpx.HTTPTransport`` put, and reads
  the answers (``Retry-After``, an encoded body, errors, timeouts) as they read them.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import socket
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import httpx
import orjson
import pytest

from gateway import audit, package
from gateway.auditlog import GENESIS, Filters, Record, digest, verify
from gateway.consent import Decision
from gateway.label import CONFIDENTIALITY
from gateway.model import Ident
from gateway.outbox import Finish, Outbox
from gateway.redact import View
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import make_engine
from gateway.translate import narrative as nv
from gateway.translate.ids import resource_id, urn
from gateway.transports.base import FHIR_JSON
from gateway.transports.http import JOSE, HttpTransport
from tests.dispatch_cases import SCENARIOS, run
from tests.e2e.test_workers_pg import accept_letters

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
KEY = generate_key()
Json = dict[str, Any]


# -- reference forms (as they were before the fast ones) ---------------------------------------------
def _reference_message(
    view: View, letter_key: str, timestamp: str, sender: package.Sender, category_system: str, replaces: str | None
) -> Json:
    recipient = view.recipient
    assert recipient.endpoint is not None and view.communication is not None
    header_id = resource_id("MessageHeader", letter_key, recipient.id)
    author = next(
        (
            urn(r["id"])
            for r in view.resources
            if r["resourceType"] == "PractitionerRole"
            and any(u == r["id"] for u in package._sender_ids(view.communication))
        ),
        None,
    )
    lines = [("Adresse", recipient.endpoint.address)]
    if replaces:
        lines.append(("Remplace", f"le message {replaces} (version précédente de la lettre)"))
    label = {"system": category_system, "code": "logistics"}
    focus = view.communication["id"]
    header = package._header(
        header_id, package.EVENT, recipient, sender, focus, label, lines, author=author, replaces=replaces
    )
    entries = [header, *view.resources]
    labels: dict[tuple[str, str], Json] = {}
    for res in entries:
        for coding in res.get("meta", {}).get("security", []):
            if coding.get("system") in (category_system, CONFIDENTIALITY):
                labels.setdefault(
                    (coding["system"], coding["code"]), {"system": coding["system"], "code": coding["code"]}
                )
    return {
        "resourceType": "Bundle",
        "id": resource_id("Bundle", letter_key, recipient.id, "message"),
        "meta": {"security": list(labels.values())},
        "type": "message",
        "timestamp": timestamp,
        "entry": [{"fullUrl": urn(r["id"]), "resource": r} for r in entries],
    }


def _reference_agents(recipient_ref: str | None, display: str, decision: Decision | None) -> list[Json]:
    source = {
        "type": {"coding": [{"system": audit.DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": audit.OBSERVER,
        "requestor": False,
    }
    recipient: Json = {
        "type": {"coding": [{"system": audit.DCM, "code": "110152", "display": "Destination Role ID"}]},
        "who": {"reference": recipient_ref, "display": display} if recipient_ref else {"display": display},
        "requestor": False,
    }
    if decision is not None and decision.consents:
        recipient["policy"] = list(decision.consents)
    return [source, recipient]


def _reference_disclosure(
    view: View,
    decision: Decision,
    patient: Ident,
    letter_key: str,
    recorded: str,
    message: Json | None,
    reasons: Sequence[str],
) -> Json:
    entity_type, category = audit.ENTITY_TYPE, audit.CATEGORY_SYSTEM
    recipient = view.recipient
    sent: list[Json] = []
    if message is not None:
        sent.append(
            {
                "what": {"reference": urn(message["id"]), "display": "message Bundle"},
                "type": {"system": entity_type, "code": "2", "display": "System Object"},
                "description": f"message {message['entry'][0]['resource']['id']} (MessageHeader.id)",
            }
        )
        for entry in message["entry"][1:]:
            res = entry["resource"]
            labels = [s for s in res.get("meta", {}).get("security", []) if s.get("system") == category]
            item: Json = {
                "what": {"reference": entry["fullUrl"], "display": f"{res['resourceType']}/{res['id']}"},
                "type": {"system": entity_type, "code": "2", "display": "System Object"},
                "description": "sent",
            }
            if labels:
                item["securityLabel"] = labels
            sent.append(item)
    consents = [
        {
            "what": {"reference": ref},
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Consent"},
            "description": "consent version that decided",
        }
        for ref in decision.consents
    ]
    ignored = [
        {
            "what": {"reference": b.consent} if b.consent else {"display": b.rule},
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Consent"},
            "description": f"consent not applied: {b.text}",
        }
        for b in decision.ignored
    ]
    allowed = ", ".join(sorted(decision.categories)) or "rien"
    bases = "; ".join(
        f"{c}: {b.rule}" + (f" ({b.consent})" if b.consent else "") for c, b in sorted(decision.by_category.items())
    )
    outcome_desc = (
        f"{'sent' if message is not None else 'nothing sent'} to {recipient.display} ({decision.kind or 'kind unknown'}, "
        f"{'care team' if decision.care_team else 'outside the care team'}); allowed: {allowed}; "
        f"{len(view.withheld)} item(s) withheld; basis — {bases}"
    )
    return {
        "resourceType": "AuditEvent",
        "id": resource_id("AuditEvent", letter_key, recipient.id, "disclosure", recorded),
        "meta": {"security": [{"system": category, "code": "logistics"}]},
        "text": nv.generated(
            nv.dl(
                [
                    ("Destinataire", recipient.display),
                    ("Motif d'envoi", ", ".join(reasons)),
                    ("Autorisé", allowed),
                    ("Retenu", f"{len(view.withheld)} élément(s)"),
                ]
            ),
        ),
        "type": {"system": audit.DCM, "code": "110106", "display": "Export"},
        "subtype": [{"system": audit.LIFECYCLE, "code": "disclose", "display": "Disclose"}],
        "action": "R",
        "recorded": recorded,
        "outcome": "0",
        "outcomeDesc": outcome_desc,
        "purposeOfEvent": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "COC"}]}
        ],
        "agent": _reference_agents(recipient.ref, recipient.display, decision),
        "source": {
            "observer": audit.OBSERVER,
            "type": [{"system": audit.SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [
            audit._patient_entity(patient),
            *consents,
            *ignored,
            *sent,
            *(audit._withheld_entity(w) for w in view.withheld),
        ],
    }


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_messages_and_disclosure_events_are_byte_for_byte_the_reference_ones(scenario: str) -> None:
    dispatched = run(scenario)
    letter = dispatched.translation.translation.letter
    letter_key = f"{letter.doc_id.system}|{letter.doc_id.value}"
    patient = letter.patient.ids[0]
    recorded = dispatched.audit["timestamp"]
    events = {e["resource"]["id"]: e["resource"] for e in dispatched.audit["entry"]}
    sender = package.Sender(endpoint=Settings().public_url)
    checked = 0
    for routed in dispatched.routing.routed:
        rid = routed.recipient.id
        view, decision = dispatched.views[rid], dispatched.decisions[rid]
        message = dispatched.messages.get(rid)
        if message is not None:
            system = message["entry"][0]["resource"]["meta"]["security"][0]["system"]
            for replaces in (None, "0a1b2c3d-earlier-message"):
                expected = _reference_message(view, letter_key, recorded, sender, system, replaces)
                assert orjson.dumps(package.message(view, letter_key, recorded, sender, system, replaces)) == (
                    orjson.dumps(expected)
                )
            assert orjson.dumps(message) == orjson.dumps(
                _reference_message(view, letter_key, recorded, sender, system, None)
            )
        event = audit.disclosure_event(view, decision, patient, letter_key, recorded, message, routed.reasons)
        reference = _reference_disclosure(view, decision, patient, letter_key, recorded, message, routed.reasons)
        assert orjson.dumps(event) == orjson.dumps(reference)
        assert orjson.dumps(events[event["id"]]) == orjson.dumps(reference)
        checked += 1
    assert checked == len(dispatched.routing.routed) > 0


def test_route_and_acknowledgement_events_keep_their_agents() -> None:
    event = audit.acknowledgement_event("m-1", True, "processed", "Dr X", "2026-11-23T12:00:00+00:00")
    assert event["agent"] == _reference_agents(None, "Dr X", None)


# -- the outbox ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _collected() -> Iterator[None]:
    """After this module, collect until nothing is left: a disposed engine is freed in two passes (its
    reader pool goes with it, through a weak mapping), and the heap checks that follow start clean."""
    yield
    while gc.collect():
        pass


@pytest.fixture
def outbox(database_url: str) -> Iterator[Outbox]:
    engine = make_engine(database_url)
    found = Outbox(engine, Signer(KEY), checkpoint_every=5)
    yield found
    found.reader.dispose()
    engine.dispose()


def _event(n: int, patient: bool = True) -> Json:
    entity = [
        {
            "what": {"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "248057511410235"}},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
        }
    ]
    return {
        "resourceType": "AuditEvent",
        "id": f"ev-{n:04d}",
        "subtype": [{"code": "transmit"}],
        "outcome": "0",
        "entity": entity if patient else [],
    }


def test_finish_many_records_each_outcome_only_while_its_claim_holds(outbox: Outbox) -> None:
    accept_letters(outbox, 2, 3, NOW)
    claimed = outbox.claim("w1", NOW, limit=10)
    assert len(claimed) == 6
    lease = timedelta(minutes=2)
    later = NOW + lease + timedelta(seconds=1)
    (taken,) = outbox.claim("w2", later, limit=1, lease=lease)  # w1's lease ran out: w2 takes one
    mine = [d for d in claimed if d.message_id != taken.message_id]
    retry_at = NOW + timedelta(seconds=30)

    def finish(d: Any, status: str, *events: Json, error: str | None = None, due: datetime | None = None) -> Finish:
        return Finish(d.message_id, d.letter_id, status, d.recipient_id, error, due, events)

    outcomes = [
        finish(mine[0], "acknowledged", _event(1)),
        finish(taken, "failed-retrying", _event(2), error="HTTP 503", due=retry_at),
        finish(mine[1], "acknowledged", _event(3)),
        finish(mine[2], "sent", _event(4), _event(5)),
        finish(mine[3], "failed-retrying", error="HTTP 503", due=retry_at),
        finish(mine[4], "dead-lettered", _event(6), error="HTTP 400: no"),
        finish(mine[1], "acknowledged", _event(7)),
    ]
    done = outbox.finish_many(outcomes, "w1", later)
    # the one w2 took is not w1's to record; the same delivery twice: recorded once, the first time
    assert done == [True, False, True, True, True, True, False]
    rows = {d.message_id: d for d in outbox.deliveries()}
    assert (rows[taken.message_id].status, rows[taken.message_id].attempts) == ("sending", 0), "w2's claim holds"
    for d in mine[:2]:
        ack = rows[d.message_id]
        assert (ack.status, ack.attempts, ack.sent_at, ack.acknowledged_at, ack.last_error, ack.due_at) == (
            "acknowledged", 1, later, later, None, later,
        )  # fmt: skip
    sent = rows[mine[2].message_id]
    assert (sent.status, sent.attempts, sent.sent_at, sent.acknowledged_at) == ("sent", 1, later, None)
    retrying = rows[mine[3].message_id]
    assert (retrying.status, retrying.attempts, retrying.due_at, retrying.last_error, retrying.sent_at) == (
        "failed-retrying", 1, retry_at, "HTTP 503", None,
    )  # fmt: skip
    dead = rows[mine[4].message_id]
    assert (dead.status, dead.last_error, dead.due_at, dead.updated_at) == (
        "dead-lettered",
        "HTTP 400: no",
        later,
        later,
    )
    with outbox.engine.connect() as conn:
        claims = {
            m: (w, a is None)
            for m, w, a in conn.exec_driver_sql("SELECT message_id, claimed_by, claimed_at FROM delivery")
        }
    assert claims == {taken.message_id: ("w2", False), **{d.message_id: (None, True) for d in mine}}
    # only what was recorded is audited, in order, with its letter and recipient
    stored = [(r.id, r.letter_id, r.recipient) for r in _records(outbox)]
    assert stored == [
        ("ev-0001", mine[0].letter_id, mine[0].recipient_id),
        ("ev-0003", mine[1].letter_id, mine[1].recipient_id),
        ("ev-0004", mine[2].letter_id, mine[2].recipient_id),
        ("ev-0005", mine[2].letter_id, mine[2].recipient_id),
        ("ev-0006", mine[4].letter_id, mine[4].recipient_id),
    ]
    assert verify(outbox.engine, [KEY]).ok


def test_finish_many_with_nothing_recorded_writes_no_audit(outbox: Outbox) -> None:
    accept_letters(outbox, 1, 2, NOW)
    claimed = outbox.claim("w1", NOW, limit=10)
    done = outbox.finish_many(
        [Finish(d.message_id, d.letter_id, "acknowledged", audit_events=[_event(1)]) for d in claimed], "w9", NOW
    )
    assert done == [False, False] and outbox.finish_many([], "w1", NOW) == []
    assert _records(outbox) == []


def _records(outbox: Outbox) -> list[Record]:
    return list(outbox.log.iterate(Filters()))


def test_the_audit_chain_of_a_delivery_run_verifies_and_every_hash_is_recomputable(outbox: Outbox) -> None:
    accept_letters(outbox, 3, 3, NOW)
    outbox.accept(
        document_key="urn:oid:1.2.250.1.999|with-events", set_key=None, version=None, client="test",
        media_type="application/xml", body=b"<x/>", deliveries=[("m-ev", "r", "Practitioner/r", "http://x")],
        audit_events=[_event(100), _event(101)], now=NOW,
    )  # fmt: skip
    for round_ in range(3):
        at = NOW + timedelta(seconds=round_)
        claimed = outbox.claim(f"w{round_}", at, limit=4)
        outcomes = [  # the acknowledgement of m-ev names no patient: it is filed under its letter's
            Finish(d.message_id, d.letter_id, "acknowledged", d.recipient_id,
                   audit_events=[_event(10 * round_ + i, patient=d.message_id != "m-ev")])
            for i, d in enumerate(claimed)
        ]  # fmt: skip
        assert all(outbox.finish_many(outcomes, f"w{round_}", at))
    records = _records(outbox)
    assert [r.seq for r in records] == list(range(1, 13))
    assert records[0].prev_hash == GENESIS
    for before, record in pairwise(records):
        assert record.prev_hash == before.hash
    for record in records:
        assert record.hash == digest(
            record.prev_hash, record.id, record.at, record.letter_id, record.patient, record.recipient,
            record.outcome, record.kind, record.zbody or b"",
        )  # fmt: skip
        assert record.patient == "urn:oid:1.2.250.1.213.1.4.8|248057511410235", record
    assert sum(not e.get("entity") for e in outbox.audit_events()) == 1
    report = verify(outbox.engine, [KEY])
    assert report.ok and report.records == 12 and report.checkpoints == 2, report.problems


def test_claim_by_letters_takes_exactly_their_queued_deliveries_up_to_the_limit(outbox: Outbox) -> None:
    hold = timedelta(seconds=5)
    accept_letters(outbox, 6, 2, NOW, hold=hold)
    letters = sorted({d.letter_id for d in outbox.deliveries()})
    for count in (1, 3, 2):
        wanted, letters = letters[:count], letters[count:]
        taken = outbox.claim("w", NOW, limit=100, letters=wanted)
        assert {d.letter_id for d in taken} == set(wanted) and len(taken) == 2 * count
        assert all(d.status == "sending" for d in taken)
        assert outbox.claim("w", NOW, limit=100, letters=wanted) == [], "claimed once"
    assert letters == []
    accept_letters(outbox, 3, 3, NOW, hold=hold, first=10)
    fresh = sorted({d.letter_id for d in outbox.deliveries() if d.status == "queued"})
    assert len(outbox.claim("w", NOW, limit=4, letters=fresh)) == 4, "at most the limit"
    assert len(outbox.claim("w", NOW, limit=100, letters=fresh)) == 5
    assert outbox.claim("w", NOW, limit=100) == [], "nothing else is due"


# -- the HTTP transport ----------------------------------------------------------------------------
class _Server:
    """A loopback HTTP/1.1 server keeping each request's raw bytes and answering from a script."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.answers: list[bytes | None] = []  # None: close without answering; b"": no answer until closed
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._connection, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
                )  # fmt: skip
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buffer = rest[length:]
                answer = self.answers.pop(0) if self.answers else _ok(b"m-1")
                if answer is None:
                    return
                if answer == b"":
                    self.stop.wait(10)
                    return
                conn.sendall(answer)

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        for thread in self.threads:
            thread.join(5)


def _answer(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _ok(message_id: bytes, code: bytes = b"ok") -> bytes:
    body = b'{"entry":[{"resource":{"response":{"identifier":"' + message_id + b'","code":"' + code + b'"}}}]}'
    return _answer("200 OK", body, "Content-Type: application/fhir+json")


@pytest.fixture
def server() -> Iterator[_Server]:
    found = _Server()
    yield found
    found.close()


def _httpx_post(url: str, payload: bytes, content_type: str) -> httpx.Response:
    """What the transport used to do: an httpx Request through httpx's own transport."""
    with httpx.HTTPTransport() as transport:
        request = httpx.Request(
            "POST", url, content=payload, headers={"Content-Type": content_type, "Accept": FHIR_JSON},
            extensions={"timeout": httpx.Timeout(10.0).as_dict()},
        )  # fmt: skip
        response = transport.handle_request(request)
        response.read()
        response.close()
        return response


@pytest.mark.parametrize(
    ("endpoint", "content_type", "payload"),
    [
        ("/fhir/ep-1", FHIR_JSON, orjson.dumps({"resourceType": "Bundle", "id": "é" * 3000})),
        ("/fhir/ep-2/", JOSE, b"eyJhbGciOi.x.y.z.w"),
        ("/fhir/a%20b;x?q=1", FHIR_JSON, b""),
    ],
)
def test_the_request_on_the_wire_is_the_one_httpx_sends(
    server: _Server, endpoint: str, content_type: str, payload: bytes
) -> None:
    url = f"http://127.0.0.1:{server.port}{endpoint}"
    transport = HttpTransport()
    for _ in range(2):  # the second on the kept-alive connection, with the endpoint's parsed URL reused
        outcome = transport.send(payload, url, "m-1", content_type=content_type)
        assert (outcome.kind, outcome.detail) == ("ok", "acknowledged")
    transport.close()
    _httpx_post(url.rstrip("/") + "/$process-message", payload, content_type)
    assert len(server.requests) == 3
    assert server.requests[0] == server.requests[1] == server.requests[2]
    assert server.requests[0].startswith(b"POST /fhir/")
    assert b"\r\nHost: 127.0.0.1:" in server.requests[0]


def test_answers_are_read_as_httpx_reads_them(server: _Server) -> None:
    url = f"http://127.0.0.1:{server.port}/fhir"
    transport = HttpTransport(timeout=0.5)
    zipped = gzip.compress(_ok(b"m-1").split(b"\r\n\r\n", 1)[1])
    answered = b'{"entry":[{"resource":{"response":{"identifier":"m-1","code":"transient-error"}}}]}'
    server.answers += [
        _answer("503 Service Unavailable", b"", "Retry-After: 7"),
        _answer("429 Too Many Requests", b"", "Retry-After: 3", "retry-after: 4"),  # joined: not a number
        _answer("503 Service Unavailable", b"", "Retry-After: Wed, 21 Oct 2026 07:28:00 GMT"),
        _answer("200 OK", answered, "Retry-After: 2.5"),
        _answer("400 Bad Request", b'{"issue":[{"diagnostics":"no patient"}]}'),
        _answer("200 OK", zipped, "Content-Encoding: gzip"),
        _ok(b"m-2"),
        _answer("200 OK", b"not json"),
        _ok(b"m-1", b"fatal-error"),
        None,
        b"",
    ]
    seen = [transport.send(b"{}", url, "m-1") for _ in range(11)]
    transport.close()
    assert [(o.kind, o.detail, o.retry_after) for o in seen] == [
        ("transient", "HTTP 503", 7.0),
        ("transient", "HTTP 429", None),
        ("transient", "HTTP 503", None),
        ("transient", "receiver answered transient-error", 2.5),
        ("permanent", "HTTP 400: no patient", None),
        ("ok", "acknowledged", None),
        ("transient", "response is for another message (m-2)", None),
        ("transient", "HTTP 200 without a readable response message", None),
        ("permanent", "receiver answered fatal-error", None),
        ("transient", "connection failed: RemoteProtocolError", None),
        ("transient", "timeout", None),
    ]


def test_an_unreachable_endpoint_is_a_transient_connection_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        outcome = HttpTransport(timeout=2.0).send(b"{}", f"http://127.0.0.1:{port}/fhir", "m-1")
    assert (outcome.kind, outcome.detail) == ("transient", "connection failed: ConnectError")
    with pytest.raises(httpx.InvalidURL):  # as before: a broken address is not a transport failure
        HttpTransport().send(b"{}", "http://[::1/fhir", "m-1")
