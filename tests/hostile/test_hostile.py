"""Hostile input, one attack at a time, through the service (and the CLI where it writes files).

Each test names the attack and checks what must hold: a 4xx OperationOutcome (never a 500), nothing
stored but the refusal's audit record, no file content or network request leaking out, bounded time
and memory, no executable script in any HTML the gateway renders, no file written outside the
directory it was given.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import http.server
import io
import re
import resource
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from lxml import etree

from gateway.api.limits import BodyLimit
from gateway.api.outcomes import ApiError
from gateway.cli import main as cli_main
from gateway.errors import EncodingError, UnsafeInput
from gateway.ingest.xml import parse_xml
from gateway.transports import xdm
from tests.conftest import FIXTURES
from tests.fuzz.world import ADMIN, AUDITOR, HIS, World, auth, world

S1 = FIXTURES / "cda" / "ldl-ses-s1-2022.xml"
BAD = FIXTURES / "cda" / "bad"
PASSWD = Path("/etc/passwd")
MiB = 1024 * 1024


@pytest.fixture
def service(tmp_path: Path) -> Iterator[World]:
    with world(tmp_path) as w:
        yield w


def _letter() -> bytes:
    return S1.read_bytes()


def _with_doctype(body: bytes, doctype: bytes, reference: bytes = b"&xxe;") -> bytes:
    """The letter with ``doctype`` after its XML declaration and ``reference`` in its title."""
    head, _, rest = body.partition(b"?>")
    rest = rest.replace(b"<title>", b"<title>" + reference, 1)
    return head + b"?>\n" + doctype + rest


def _refused(w: World, response: Any, status: int | tuple[int, ...], before: dict[str, int]) -> dict[str, Any]:
    """A 4xx OperationOutcome, and nothing stored but the refusal's audit record."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text[:500]
    body = response.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error", body
    after = w.rows()
    assert (after["letter"], after["delivery"]) == (before["letter"], before["delivery"])
    assert after["audit_event"] == before["audit_event"] + 1, (before, after)
    return dict(body)


# -- XXE -----------------------------------------------------------------------------------------------
class _Listener:
    """A real HTTP server on loopback that records every request it gets."""

    def __init__(self) -> None:
        requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                payload = b'<!ENTITY leak "LEAKED-BY-NETWORK">'
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return None

        self.requests = requests
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    server = _Listener()
    yield server
    server.close()


def _passwd_markers() -> list[str]:
    first = PASSWD.read_text(encoding="utf-8", errors="replace").splitlines()[0] if PASSWD.exists() else "root:x:0:0"
    return [first, "root:x:0:0", "/bin/bash", "/usr/sbin/nologin"]


def test_xxe_file_entity_is_refused_and_leaks_nothing(service: World) -> None:
    attacks = [
        _with_doctype(_letter(), b'<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'),
        _with_doctype(_letter(), b'<!DOCTYPE ClinicalDocument [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>', b""),
        _with_doctype(_letter(), b'<!DOCTYPE ClinicalDocument SYSTEM "file:///etc/passwd">', b""),
        (BAD / "xxe-file.xml").read_bytes(),
    ]
    for attack in attacks:
        before = service.rows()
        response = service.push(attack)
        outcome = _refused(service, response, 400, before)
        assert outcome["issue"][0]["code"] == "security", outcome
        for marker in _passwd_markers():
            assert marker not in response.text
        with pytest.raises(UnsafeInput):
            parse_xml(attack, "xxe")


def test_xxe_network_entity_never_reaches_the_network(service: World, listener: _Listener) -> None:
    url = f"http://127.0.0.1:{listener.port}"
    attacks = [
        _with_doctype(_letter(), f'<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "{url}/entity">]>'.encode()),
        _with_doctype(_letter(), f'<!DOCTYPE ClinicalDocument [<!ENTITY % p SYSTEM "{url}/param"> %p;]>'.encode(), b""),
        _with_doctype(_letter(), f'<!DOCTYPE ClinicalDocument SYSTEM "{url}/dtd">'.encode(), b""),
        # no DTD at all: XInclude, a schema location, a stylesheet PI — none may be fetched
        _letter().replace(
            b"<title>",
            f'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="{url}/xinclude" parse="text"/><title>'.encode(),
            1,
        ),
        _letter().replace(b"?>", f'?>\n<?xml-stylesheet type="text/xsl" href="{url}/xsl"?>'.encode(), 1),
        _letter().replace(
            b"<ClinicalDocument ", f'<ClinicalDocument xsi:schemaLocation="urn:hl7-org:v3 {url}/cda.xsd" '.encode(), 1
        ),
    ]
    statuses = []
    for attack in attacks:
        before = service.rows()
        response = service.push(attack)
        assert response.status_code < 500, response.text
        assert "LEAKED-BY-NETWORK" not in response.text
        if response.status_code >= 400:
            _refused(service, response, response.status_code, before)
        statuses.append(response.status_code)
    time.sleep(0.2)  # a request on its way would have arrived by now
    assert listener.requests == [], f"the gateway fetched {listener.requests}"
    assert statuses[:4] == [400, 400, 400, 400], statuses  # the DTDs and the XInclude are refused outright


# -- entity expansion, blow-ups, nesting -----------------------------------------------------------------
def _bounded(call: Any, seconds: float, megabytes: int) -> Any:
    """Run ``call`` (the in-process service answers in this process's threads) and check the CPU time it
    burnt and how far the peak memory grew: CPU, not wall-clock time, so a busy machine cannot fail it —
    an entity expansion would burn minutes of CPU, far over the bound."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.process_time()
    result = call()
    elapsed = time.process_time() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert elapsed < seconds, f"burnt {elapsed:.1f} s of CPU"
    assert grown < megabytes, f"peak memory grew by {grown:.0f} MiB"
    return result


def test_billion_laughs_is_refused_quickly(service: World) -> None:
    lol = b'<!DOCTYPE lolz [<!ENTITY lol "lol">' + b"".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'.encode() for i in range(1, 10)
    )
    attacks = [(BAD / "billion-laughs.xml").read_bytes(), _with_doctype(_letter(), lol + b"]>", b"&lol9;")]
    for attack in attacks:
        before = service.rows()
        response = _bounded(lambda a=attack: service.push(a), 2.0, 64)
        assert _refused(service, response, 400, before)["issue"][0]["code"] == "security"


def test_quadratic_blowup_is_refused_and_long_values_are_bounded(service: World) -> None:
    big = b"B" * 100_000
    quadratic = _with_doctype(_letter(), b'<!DOCTYPE ClinicalDocument [<!ENTITY a "' + big + b'">]>', b"&a;" * 20_000)
    for attack in [(BAD / "quadratic-blowup.xml").read_bytes(), quadratic]:
        before = service.rows()
        response = _bounded(lambda a=attack: service.push(a), 3.0, 64)
        assert _refused(service, response, 400, before)["issue"][0]["code"] == "security"
    # no DTD: one very long attribute, one very long text, many attributes — a clear answer, no 500, bounded
    long_attribute = _letter().replace(
        b'extension="LDL-SES-20261030-000457"', b'extension="' + b"7" * (8 * MiB) + b'"', 1
    )
    long_text = _letter().replace(b"<title>", b"<title>" + b"T" * (9 * MiB), 1)
    many_attributes = _letter().replace(
        b"<title>", b"<title " + b" ".join(f'a{i}="x"'.encode() for i in range(200_000)) + b">", 1
    )
    for attack in [long_attribute, long_text, many_attributes]:
        assert len(attack) < service.settings.max_document_bytes
        before = service.rows()
        response = _bounded(lambda a=attack: service.push(a), 20.0, 600)
        assert response.status_code < 500, response.text[:300]
        if response.status_code >= 400:
            _refused(service, response, response.status_code, before)


def test_deep_nesting_is_refused_quickly(service: World) -> None:
    levels = 20_000
    nested = _letter().replace(b"<title>", b"<title>" + b"<content>" * levels + b"x" + b"</content>" * levels, 1)
    json_nested = b'{"resourceType": "Bundle", "type": "document", "entry": ' + b"[" * levels + b"]" * levels + b"}"
    cases = [((BAD / "deep-nesting.xml").read_bytes(), "application/hl7-cda+xml"), (nested, "application/hl7-cda+xml")]
    cases.append((json_nested, "application/fhir+json"))
    for attack, media_type in cases:
        before = service.rows()
        response = _bounded(lambda a=attack, m=media_type: service.push(a, m), 2.0, 64)
        _refused(service, response, 400, before)
    with pytest.raises(UnsafeInput, match="deep"):
        parse_xml(nested, "nested")


# -- size ----------------------------------------------------------------------------------------------
class _Server:
    """The real app behind uvicorn on loopback (for what a TestClient cannot show: reads on the wire)."""

    def __init__(self, w: World) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(w.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _raw_post(port: int, headers: list[str], chunks: Iterator[bytes]) -> tuple[int, bytes, int]:
    """POST by hand; stop sending once the server answers. Returns (status, body, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = "POST /letters HTTP/1.1\r\nHost: localhost\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
        sock.sendall(head.encode())
        sock.setblocking(False)
        answer = b""
        try:
            for chunk in chunks:
                with contextlib.suppress(BlockingIOError):
                    answer += sock.recv(65536)
                if answer:
                    break
                view = memoryview(chunk)
                while view:
                    try:
                        n = sock.send(view)
                    except BlockingIOError:
                        try:
                            answer += sock.recv(65536)
                        except BlockingIOError:
                            time.sleep(0.001)
                        if answer:
                            break
                        continue
                    sent += n
                    view = view[n:]
                if answer:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.setblocking(True)
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            try:
                more = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not more:
                break
            answer += more
        head_bytes, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head_bytes)
        while length and len(body) < int(length.group(1)):
            more = sock.recv(65536)
            if not more:
                break
            body += more
    status = int(head_bytes.split(b" ", 2)[1]) if head_bytes.startswith(b"HTTP/") else 0
    return status, body, sent


def test_oversize_bodies_are_refused_413_without_reading_them(service: World) -> None:
    limit = service.settings.max_document_bytes
    total = limit + 5 * MiB
    server = _Server(service)
    try:
        chunk = b"<x>" + b"A" * (64 * 1024 - 7) + b"</x>"

        def body() -> Iterator[bytes]:
            for _ in range(total // len(chunk) + 1):
                yield chunk

        # Content-Length says it: refused before the body is read (a few socket buffers at most went out)
        before = service.rows()
        status, answer, sent = _raw_post(
            server.port,
            [f"Authorization: Bearer {HIS}", "Content-Type: application/hl7-cda+xml", f"Content-Length: {total}"],
            body(),
        )
        assert status == 413, answer[:300]
        assert orjson.loads(answer)["issue"][0]["code"] == "too-long"
        assert sent < limit, f"{sent} bytes went out before the 413"
        after = service.rows()
        assert (after["letter"], after["delivery"]) == (before["letter"], before["delivery"])
        assert after["audit_event"] == before["audit_event"] + 1

        # chunked (no Content-Length): refused as soon as the limit is passed
        def chunked() -> Iterator[bytes]:
            for _ in range(8):
                yield from (f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in body())
            yield b"0\r\n\r\n"

        status, answer, sent = _raw_post(
            server.port,
            [f"Authorization: Bearer {HIS}", "Content-Type: application/hl7-cda+xml", "Transfer-Encoding: chunked"],
            chunked(),
        )
        assert status == 413, answer[:300]
        assert orjson.loads(answer)["issue"][0]["code"] == "too-long"
        assert sent < 4 * total, f"{sent} bytes: the whole body was read before the answer"
    finally:
        server.stop()


@pytest.mark.parametrize("declared", [True, False])
def test_the_body_limit_reads_no_more_than_the_limit(declared: bool) -> None:
    """The middleware itself: with Content-Length over the limit nothing is read; chunked, at most one
    chunk past the limit."""
    import asyncio

    reads: list[int] = []
    limit, chunk = 1000, 300

    async def receive() -> dict[str, Any]:
        reads.append(chunk)
        return {"type": "http.request", "body": b"x" * chunk, "more_body": True}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            await receive()

    headers = [(b"content-length", b"5000")] if declared else []
    with pytest.raises(ApiError) as refused:
        asyncio.run(BodyLimit(app, limit)({"type": "http", "headers": headers}, receive, None))
    assert refused.value.status == 413
    assert sum(reads) == (0 if declared else limit - limit % chunk + chunk)


def test_oversize_letters_are_refused_through_the_test_client_too(service: World) -> None:
    before = service.rows()
    response = service.push(b"<a>" + b" " * (service.settings.max_document_bytes + 10) + b"</a>")
    assert _refused(service, response, 413, before)["issue"][0]["code"] == "too-long"
    before = service.rows()
    consent = b'{"resourceType": "Consent", "x": "' + b"y" * (service.settings.max_document_bytes + 10) + b'"}'
    response = service.client.post(
        "/Consent", content=consent, headers={**auth(ADMIN), "Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 413 and response.json()["resourceType"] == "OperationOutcome"


# -- encodings -----------------------------------------------------------------------------------------
def test_invalid_utf8_is_refused(service: World) -> None:
    broken = _letter().replace(b"Lettre de liaison", b"Lettre \xff\xfe\xc3\x28 liaison", 1)
    latin1 = (BAD / "latin1-declared-utf8.xml").read_bytes()
    json_broken = (FIXTURES / "fhir" / "document-s1.json").read_bytes().replace(b"Lettre", b"Let\xc3\x28tre", 1)
    for attack, media_type in [
        (broken, "application/hl7-cda+xml"),
        (latin1, "application/hl7-cda+xml"),
        (json_broken, "application/fhir+json"),
    ]:
        before = service.rows()
        outcome = _refused(service, service.push(attack, media_type), 400, before)
        assert re.search(r"(?i)utf-?8|encoding", outcome["issue"][0]["diagnostics"]), outcome
    with pytest.raises(EncodingError):
        parse_xml(broken, "broken")


def test_utf16_with_bom_is_handled_and_cannot_hide_a_doctype(service: World) -> None:
    text = _letter().decode("utf-8").replace('encoding="UTF-8"', 'encoding="UTF-16"', 1)
    utf16 = text.encode("utf-16")  # with its BOM
    assert utf16[:2] in (b"\xff\xfe", b"\xfe\xff")
    response = service.push(utf16)
    assert response.status_code in (200, 202), response.text  # the same letter, read correctly
    hidden = _with_doctype(_letter(), b'<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>')
    hidden16 = hidden.decode("utf-8").replace('encoding="UTF-8"', 'encoding="UTF-16"', 1).encode("utf-16")
    before = service.rows()
    assert _refused(service, service.push(hidden16), 400, before)["issue"][0]["code"] == "security"
    # UTF-16 without BOM (the parser recognises "<?xml" in UTF-16): the same letter again, or a clear refusal
    response = service.push(text.encode("utf-16-le"))
    assert response.status_code in (200, 400), response.text
    # ...and without a BOM the DOCTYPE cannot hide either (the byte scan misses it; the parsed tree does not)
    for codec in ("utf-16-le", "utf-16-be"):
        unmarked = hidden.decode("utf-8").replace('encoding="UTF-8"', 'encoding="UTF-16"', 1).encode(codec)
        before = service.rows()
        outcome = _refused(service, service.push(unmarked), 400, before)
        assert outcome["issue"][0]["code"] in ("security", "structure"), outcome
        for marker in _passwd_markers():
            assert marker not in str(outcome)


# -- script in the narrative -----------------------------------------------------------------------------
SCRIPTS = [
    b"<script>alert('cda-script')</script>",
    b'<linkHtml href="javascript:alert(1)">clic</linkHtml>',
    b'<img xmlns="http://www.w3.org/1999/xhtml" src="x" onerror="alert(2)"/>',
    b"&lt;script&gt;alert('escaped-text')&lt;/script&gt;",
    b'<content ID="x" onmouseover="alert(3)" styleCode="Bold">javascript:alert(4)</content>',
    b'<renderMultiMedia referencedObject="javascript:alert(5)"/>',
    b"<![CDATA[<script>alert('cdata')</script>]]>",
]


def _scripted_letter() -> bytes:
    letter = _letter()
    injected = b"".join(SCRIPTS)
    # into the narrative of the first sections, a table cell, the title and the patient's name
    letter = letter.replace(b"<td>Statut du document</td>", b"<td>Statut du document" + injected + b"</td>", 1)
    letter = re.sub(rb"(<text>)", rb"\1" + injected.replace(b"\\", b"\\\\"), letter, count=3)
    letter = letter.replace(
        b"<title>Lettre de liaison", b"<title>&lt;script&gt;alert('title')&lt;/script&gt;Lettre de liaison", 1
    )
    return letter.replace(b"<given>", b"<given>&lt;img src=x onerror=alert(9)&gt;", 1)


_EXECUTABLE_TAGS = {
    "script",
    "iframe",
    "object",
    "embed",
    "frame",
    "frameset",
    "applet",
    "base",
    "form",
    "meta",
    "link",
}


def _executable(html: str, where: str) -> list[str]:
    """What in ``html`` a browser would run: script-like elements, on* handlers, javascript: URLs."""
    found = []
    if re.search(r"<\s*script", html, re.IGNORECASE):
        found.append(f"{where}: <script")
    if re.search(r"<[^>]*\son[a-z]+\s*=", html, re.IGNORECASE):
        found.append(f"{where}: event-handler attribute")
    if re.search(r"""(href|src|action|formaction|referencedObject)\s*=\s*["']?\s*javascript:""", html, re.IGNORECASE):
        found.append(f"{where}: javascript: URL")
    return found


def _divs(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "div" and isinstance(value, str):
                yield path, value
            else:
                yield from _divs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _divs(value, f"{path}[{index}]")


def _check_xhtml(div: str, where: str) -> list[str]:
    problems = _executable(div, where)
    root = etree.fromstring(div.encode())
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        if etree.QName(element).localname.lower() in _EXECUTABLE_TAGS:
            problems.append(f"{where}: <{element.tag}>")
        for key, value in element.attrib.items():
            name, text = str(key), str(value)
            if etree.QName(name).localname.lower().startswith("on"):
                problems.append(f"{where}: attribute {name}")
            if text.strip().lower().startswith("javascript:"):
                problems.append(f"{where}: javascript: in {name}")
    return problems


def test_script_in_the_cda_narrative_never_reaches_rendered_html(service: World) -> None:
    letter = _scripted_letter()
    response = service.push(letter)
    assert response.status_code == 202, response.text
    letter_id = response.json()["letterId"]
    assert service.deliver_all() > 0 and service.transport.sent
    problems: list[str] = []
    divs = 0
    # 1. every narrative (Resource.text.div) of every message the recipients got
    for endpoint, payload in service.transport.sent:
        message = orjson.loads(payload)
        for path, div in _divs(message):
            divs += 1
            problems += _check_xhtml(div, f"{endpoint}{path}")
    assert divs > 10
    # 2. the audit pages (server-rendered HTML) that show this exchange and this patient
    login = service.client.post(
        "/audit/login",
        content=f"key={AUDITOR}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert login.status_code == 303, login.text
    hostile_query = "<script>alert('q')</script>"
    pages = {
        "/audit": service.client.get("/audit"),
        "/audit?q": service.client.get("/audit", params={"patient": hostile_query, "letter": hostile_query}),
        "/audit/exchange": service.client.get(f"/audit/exchange/{letter_id}"),
        "/audit/exchange/hostile": service.client.get("/audit/exchange/%3Cimg%20src=x%20onerror=alert(1)%3E"),
        "/audit/patient": service.client.get(
            "/audit/patient", params={"identifier": "urn:oid:1.2.250.1.213.1.4.10|244037511305285"}
        ),
        "/audit/patient?hostile": service.client.get("/audit/patient", params={"identifier": hostile_query}),
        "/audit/verify": service.client.get("/audit/verify"),
    }
    for name, page in pages.items():
        assert page.status_code < 500, (name, page.text[:300])
        assert page.headers["content-type"].startswith("text/html"), name
        problems += _executable(page.text, name)
        assert "default-src 'none'" in page.headers.get("content-security-policy", ""), name
    assert "data-testid" in pages["/audit/exchange"].text and "recipient" in pages["/audit/exchange"].text
    # 3. the IHE XDM INDEX.HTM a mail recipient opens, built from each message
    for _, payload in service.transport.sent:
        archive = zipfile.ZipFile(io.BytesIO(xdm.build_xdm(xdm.read_message(payload))))
        problems += _executable(archive.read("INDEX.HTM").decode(), "INDEX.HTM")
    assert problems == [], "\n".join(problems)


# -- SQL-ish identifiers -----------------------------------------------------------------------------------
SQLISH = ["'; DROP TABLE letter;--", "1 OR 1=1", "' OR '1'='1", '"; DELETE FROM delivery; --', "%' --", "1; SELECT 1"]


def test_sqlish_identifiers_are_refused_or_match_nothing(service: World) -> None:
    accepted = service.push(_letter())
    assert accepted.status_code == 202
    before = service.rows()
    consents_before = service.client.get("/Consent", headers=auth(ADMIN)).json()["total"]
    for value in SQLISH:
        answers = [
            service.client.get(f"/letters/{value}", headers=auth(HIS)),
            service.client.get(f"/Consent/{value}", headers=auth(ADMIN)),
            service.client.get(f"/Consent/{value}/_history", headers=auth(ADMIN)),
            service.client.get("/Consent", params={"patient": value}, headers=auth(ADMIN)),
            service.client.get("/Organization", params={"identifier": f"{value}|{value}"}, headers=auth(ADMIN)),
            service.client.get(
                "/AuditEvent",
                params={"patient": value, "letter": value, "recipient": value, "subtype": value},
                headers=auth(AUDITOR),
            ),
            service.client.get("/Patient/$audit-report", params={"identifier": value}, headers=auth(AUDITOR)),
            service.client.get("/deliveries", params={"status": value}, headers=auth(ADMIN)),
            service.client.post(f"/deliveries/{value}/$replay", headers=auth(ADMIN)),
            service.client.delete(f"/Consent/{value}", headers=auth(ADMIN)),
        ]
        for answer in answers:
            assert answer.status_code < 500, answer.text
            body = answer.json()
            if answer.status_code >= 400:
                assert body["resourceType"] == "OperationOutcome", body
            elif body.get("type") == "collection":  # the patient report: one List, of nothing
                assert [e["resource"].get("entry", []) for e in body["entry"]] == [[]], body
            elif body.get("resourceType") == "Bundle":
                assert body.get("total", len(body.get("entry", []))) == 0 and not body.get("entry"), body
            else:
                assert body == [], body  # /deliveries
    # a letter whose identifiers are SQL-ish: stored as data, nothing else touched
    letter = _letter().replace(b'extension="LDL-SES-20261030-000457"', b'extension="\'; DROP TABLE letter;--"', 1)
    letter = letter.replace(b'extension="IPP0004527891"', b'extension="1 OR 1=1"', 1)
    response = service.push(letter)
    assert response.status_code < 500, response.text
    after = service.rows()
    assert after["letter"] >= before["letter"] and after["delivery"] >= before["delivery"]
    assert service.client.get("/Consent", headers=auth(ADMIN)).json()["total"] == consents_before
    if response.status_code == 202:
        status = service.client.get(response.json()["status"], headers=auth(HIS))
        assert status.status_code == 200 and status.json()["deliveries"]
    assert service.client.get(f"/letters/{accepted.json()['letterId']}", headers=auth(HIS)).status_code == 200


# -- path traversal --------------------------------------------------------------------------------------
TRAVERSAL = ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "a\x00b.xml", "C:\\x.xml", "....//x", ".."]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_xdm_archive_member_names_are_safe(name: str) -> None:
    cleaned = xdm.safe_name(name)
    assert re.fullmatch(r"[A-Z0-9_]{1,16}(\.[A-Z0-9_]{1,4})?", cleaned), cleaned
    document = xdm.Document(name, b"data", "text/plain", "1.2.3", "titre")
    contents = xdm.Contents("m-1", "2026-11-05T10:00:00+01:00", (document,), None, (), False, "Lettre")
    with pytest.raises(ValueError):  # "unsafe archive path component", or lxml refusing a NUL
        xdm.build_xdm(contents)


def test_attachment_titles_and_names_from_a_message_stay_inside_the_archive() -> None:
    """A message whose DocumentReference attachment carries a hostile title and file name: the archive
    uses its own names (DOCnnnn.EXT) and escapes the title in INDEX.HTM."""
    hostile = "../../etc/passwd\\..\\<script>alert(1)</script>"
    message = {
        "resourceType": "Bundle",
        "type": "message",
        "timestamp": "2026-11-05T10:00:00+01:00",
        "entry": [
            {"resource": {"resourceType": "MessageHeader", "id": "m-1"}},
            {
                "resource": {
                    "resourceType": "DocumentReference",
                    "id": "../../x",
                    "content": [
                        {
                            "attachment": {
                                "contentType": "text/plain",
                                "title": hostile,
                                "url": "file:///etc/passwd",
                                "data": base64.b64encode(b"hello").decode(),
                            }
                        }
                    ],
                }
            },
        ],
    }
    archive = zipfile.ZipFile(io.BytesIO(xdm.build_xdm(xdm.read_message(orjson.dumps(message)))))
    for member in archive.namelist():
        assert (
            not member.startswith("/") and ".." not in member.split("/") and "\\" not in member and "\x00" not in member
        )
        assert all(re.fullmatch(r"[A-Z0-9_]+(\.[A-Z0-9]+)?", part) for part in member.split("/")), member
    index = archive.read("INDEX.HTM").decode()
    assert _executable(index, "INDEX.HTM") == [] and "&lt;script&gt;" in index


def test_dispatch_out_never_writes_outside_its_directory(tmp_path: Path) -> None:
    """Directory ids become file names (``DIR/<recipient-id>.json``): an id that is a path is refused."""
    directory = orjson.loads((FIXTURES / "dispatch" / "directory.json").read_bytes())
    for hostile in ["../../x", "..", "/tmp/x", "a\\..\\b", "x\x00y"]:
        bundle = copy.deepcopy(directory)
        for entry in bundle["entry"]:
            res = entry["resource"]
            if res["resourceType"] == "PractitionerRole" and res["id"] == "gp-perrin":
                res["id"] = hostile
                entry["fullUrl"] = entry["fullUrl"].rsplit("/", 1)[0] + "/" + hostile
        work = tmp_path / f"case-{abs(hash(hostile))}"
        out = work / "a" / "b" / "out"
        out.mkdir(parents=True)
        (work / "directory.json").write_bytes(orjson.dumps(bundle))
        code = cli_main(
            [
                "dispatch",
                str(FIXTURES / "dispatch" / "ldl-ses-s6-objection.xml"),
                "--directory",
                str(work / "directory.json"),
                "--consents",
                str(FIXTURES / "dispatch" / "consents-s6.json"),
                "--out",
                str(out),
                "--at",
                "2026-11-05T11:30:00+01:00",
            ]
        )
        written = {p.resolve() for p in work.rglob("*") if p.is_file()} - {(work / "directory.json").resolve()}
        outside = [p for p in written if out.resolve() not in p.parents]
        assert outside == [], (hostile, outside)
        assert code in (0, 2, 4), (hostile, code)


def test_control_characters_in_titles_do_not_break_the_xdm_metadata() -> None:
    """A FHIR string may carry U+0001 (FHIR's string regex allows it); XML 1.0 cannot: the metadata
    replaces it rather than failing the whole delivery."""
    document = xdm.Document("DOC0001.XML", b"<x/>", "text/xml", "1.2.3", "Lettre\x01de\x1fsortie")
    contents = xdm.Contents("m-1", "2026-11-05T10:00:00+01:00", (document,), None, (), False, "Lettre\x0bsortie")
    metadata = xdm.metadata_xml(contents)
    assert b"Lettre\xef\xbf\xbdde\xef\xbf\xbdsortie" in metadata and b"\x01" not in metadata
    assert zipfile.ZipFile(io.BytesIO(xdm.build_xdm(contents))).namelist()
