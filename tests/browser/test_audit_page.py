"""The audit web page in a real browser (Debian's chromium driven by Playwright).

A real gateway (API + delivery worker, SQLite outbox) and the reference receiver run with uvicorn on
loopback; the S6 letter (the patient objects to sharing with anyone outside the care team) is pushed
and delivered; then the data-protection officer logs in, searches by the patient's INS, opens the
exchange and sees that the GP got the letter while the CLIC's social worker got nothing, each
withheld element with its rule, reason and the Consent version that decided.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.api.app import create_app
from gateway.api.pages import SESSION_COOKIE
from gateway.deliver import Deliverer, RetryPolicy
from gateway.demo import seed_store
from gateway.outbox import Outbox
from gateway.seal import Signer, generate_key
from gateway.settings import Settings
from gateway.store import ResourceStore, make_engine
from gateway.transports.http import HttpTransport
from tests.conftest import FIXTURES, mappings
from tests.e2e.test_service import Receiver, _free_port

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI installs it", allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright  # noqa: E402

HIS = "his-key-browser-0123456789abcdef"
AUDITOR = "auditor-key-browser-0123456789ab"
DISPATCH = FIXTURES / "dispatch"
INS = "urn:oid:1.2.250.1.213.1.4.10|248057511410235"  # the S6 patient, as the audit records it
GP = "PractitionerRole-gp-perrin"
CLIC = "PractitionerRole-clic-ass-fabre"  # the CLIC's social worker: outside the care team, objected to
OBJECTION = "Consent/s6-opposition/_history/2"


def _serve(app: Any, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"gateway on port {port} did not start")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("audit-page")
    signer = Signer(generate_key())
    receiver = Receiver(tmp / "rx.db", signer)
    receiver.start()
    engine = make_engine(f"sqlite:///{tmp / 'gateway.db'}")
    store, outbox = ResourceStore(engine=engine), Outbox(engine, signer)
    seed_store(store, lambda ep: f"{receiver.url}/fhir/{ep}", ["consents-s6.json"])
    port = _free_port()
    settings = Settings(
        public_url=f"http://127.0.0.1:{port}",
        api_keys={HIS: frozenset({"his"}), AUDITOR: frozenset({"auditor"})},
    )
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings(),
        settings=settings,
        signer=signer,
        transports={"http": HttpTransport(timeout=5.0)},
        retry=RetryPolicy(max_attempts=3, initial=0.5, maximum=2.0),
    )
    work = threading.Thread(target=worker.run_forever, kwargs={"idle": 0.1}, daemon=True)
    work.start()
    server = _serve(create_app(settings, store, outbox, mappings(), on_accepted=worker.remember), port)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {HIS}"}, timeout=30) as client:
            answer = client.post(
                "/letters",
                content=(DISPATCH / "ldl-ses-s6-objection.xml").read_bytes(),
                headers={"Content-Type": "application/hl7-cda+xml"},
            )
            assert answer.status_code == 202, answer.text
            letter_id = str(answer.json()["letterId"])
            deliveries: list[dict[str, Any]] = []
            for _ in range(200):
                deliveries = client.get(f"/letters/{letter_id}").json()["deliveries"]
                if deliveries and all(d["status"] not in ("queued", "sending") for d in deliveries):
                    break
                time.sleep(0.05)
            states = {d["recipient"]: d["status"] for d in deliveries}
            assert states.get(GP) == "acknowledged" and states.get(CLIC) == "withheld", states
        outbox.log.checkpoint()
        yield {"base": base, "letter": letter_id, "outbox": outbox, "signer": signer}
    finally:
        worker.stop()
        server.should_exit = True
        work.join(timeout=5)
        worker.close()
        receiver.stop()
        engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"CI is set but {CHROMIUM} is missing: .ci/run installs it")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser, gateway: dict[str, Any]) -> Iterator[BrowserContext]:
    made = browser.new_context(base_url=gateway["base"])
    made.set_default_timeout(10_000)
    yield made
    made.close()


def _login(page: Page, key: str) -> int:
    page.goto("/audit/login")
    page.fill("input[name=key]", key)
    with page.expect_response(lambda r: r.url.endswith("/audit/login") and r.request.method == "POST") as info:
        page.click("button[type=submit]")
    page.wait_for_load_state()
    return info.value.status


def test_pages_without_a_session_redirect_to_the_login_form(context: BrowserContext, gateway: dict[str, Any]) -> None:
    page = context.new_page()
    for path in ("/audit", f"/audit/exchange/{gateway['letter']}", f"/audit/patient?identifier={INS}", "/audit/verify"):
        page.goto(path)
        assert page.url.endswith("/audit/login"), (path, page.url)
        assert page.locator("input[name=key]").is_visible()


def test_a_his_key_cannot_log_in(context: BrowserContext) -> None:
    page = context.new_page()
    assert _login(page, HIS) == 401
    assert page.url.endswith("/audit/login")
    assert page.get_by_test_id("login-error").is_visible()
    assert not [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    page.goto("/audit")
    assert page.url.endswith("/audit/login"), "no session after a refused login"


def test_auditor_finds_the_exchange_and_sees_what_was_withheld_and_why(
    context: BrowserContext, gateway: dict[str, Any]
) -> None:
    page = context.new_page()
    assert _login(page, AUDITOR) == 303
    assert page.url.endswith("/audit")
    (cookie,) = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert "enregistrement(s)" in page.get_by_test_id("chain-status").inner_text()

    page.get_by_test_id("search-patient").fill(INS)
    page.click("form.search button[type=submit]")
    page.wait_for_load_state()
    rows = page.get_by_test_id("exchange-row")
    assert rows.count() == 1
    assert INS in rows.first.inner_text()
    rows.first.get_by_role("link", name=gateway["letter"]).click()
    page.wait_for_load_state()
    assert page.url.endswith(f"/audit/exchange/{gateway['letter']}")

    gp = page.locator(f"[data-testid=recipient][data-recipient={GP}]")
    assert gp.get_by_test_id("sent-item").count() > 0
    assert "médical" in gp.get_by_test_id("sent-items").inner_text()
    assert gp.get_by_test_id("withheld-item").count() == 0
    assert gp.get_by_test_id("delivery-status").inner_text() == "acknowledged"

    clic = page.locator(f"[data-testid=recipient][data-recipient={CLIC}]")
    assert "CLIC" in clic.locator("h2").inner_text()
    assert clic.get_by_test_id("sent-item").count() == 0
    assert clic.get_by_test_id("nothing-sent").is_visible()
    withheld = clic.get_by_test_id("withheld-item")
    assert withheld.count() >= 1
    first = withheld.first
    assert "withheld" in (first.get_attribute("class") or "")
    assert "consentement" in first.get_by_test_id("withheld-reason").inner_text()
    assert first.get_by_test_id("withheld-consent").inner_text() == OBJECTION
    assert f"medical: consent:deny ({OBJECTION})" in clic.get_by_test_id("summary").inner_text()
    assert OBJECTION in clic.get_by_test_id("consents").inner_text()
    assert clic.get_by_test_id("delivery-status").inner_text() == "withheld"


def test_search_fields_are_escaped_not_executed(context: BrowserContext) -> None:
    page = context.new_page()
    assert _login(page, AUDITOR) == 303
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    payload = '<script>alert("xss")</script>"><img src=x onerror=alert(2)>'
    page.get_by_test_id("search-patient").fill(payload)
    page.click("form.search button[type=submit]")
    page.wait_for_load_state()
    assert page.get_by_test_id("searched").locator("code").inner_text() == payload, "shown as text"
    assert page.get_by_test_id("search-patient").input_value() == payload
    assert page.locator("main script").count() == 0 and page.locator("main img").count() == 0
    assert "&lt;script&gt;" in page.content()
    assert page.get_by_test_id("no-results").is_visible()
    page.goto("/audit/exchange/%3Cscript%3Ealert(3)%3C%2Fscript%3E")
    assert page.locator("main script").count() == 0
    assert not dialogs


def test_patient_report_is_printable_and_page_views_are_audited(
    context: BrowserContext, gateway: dict[str, Any]
) -> None:
    page = context.new_page()
    assert _login(page, AUDITOR) == 303
    page.goto(f"/audit/patient?identifier={INS}")
    rows = page.get_by_test_id("patient-row")
    assert rows.count() == 3
    clic = rows.filter(has_text="CLIC")
    assert "rien" in clic.inner_text() and OBJECTION in clic.inner_text()
    page.emulate_media(media="print")
    assert not page.locator("header").is_visible(), "navigation is not printed"
    assert rows.first.is_visible()

    page.goto("/audit/verify")
    result = page.get_by_test_id("verify-result").inner_text()
    assert "Chaîne intacte" in result and "point(s) de contrôle vérifié(s)" in result, "checked with the gateway key"

    views = [
        str(e["resource"].get("outcomeDesc", ""))
        for e in httpx.get(
            f"{gateway['base']}/AuditEvent",
            params={"subtype": "search-type", "_count": 500},
            headers={"Authorization": f"Bearer {AUDITOR}"},
        ).json()["entry"]
    ]
    for what in ("audit page /audit/patient", "audit page /audit/verify", "audit page /audit/exchange/"):
        assert any(what in text for text in views), what

    page.emulate_media(media="screen")
    page.click("header button[type=submit]")
    page.wait_for_load_state()
    assert page.url.endswith("/audit/login")
    page.goto("/audit")
    assert page.url.endswith("/audit/login"), "logged out"


def test_search_by_recipient_letter_and_dates(context: BrowserContext, gateway: dict[str, Any]) -> None:
    page = context.new_page()
    assert _login(page, AUDITOR) == 303
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    page.goto(f"/audit?recipient={CLIC}&from={today}&to={today}")
    assert page.get_by_test_id("exchange-row").count() == 1
    page.goto(f"/audit?letter={gateway['letter']}")
    assert page.get_by_test_id("exchange-row").count() == 1
    page.goto(f"/audit?recipient={CLIC}&from={tomorrow}")
    assert page.get_by_test_id("no-results").is_visible()
    answer = page.goto("/audit?from=not-a-date")
    assert answer is not None and answer.status == 400
    assert "AAAA-MM-JJ" in page.locator(".error").inner_text()


def test_verify_checks_the_signed_checkpoints_with_trusted_keys(gateway: dict[str, Any]) -> None:
    """Without a browser: the same pages installed with ``trust=`` (the gateway's public key) check the
    checkpoint signatures; a key that did not sign them shows the checkpoint as forged."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gateway.api import pages

    keys = {AUDITOR: frozenset({"auditor"})}
    for trusted, expected in ((gateway["signer"].key, "Chaîne intacte"), (generate_key(), "forged-checkpoint")):
        app = FastAPI()
        pages.install(
            app,
            log=gateway["outbox"].log,
            outbox=gateway["outbox"],
            auditor=None,
            client_of=lambda request: "client-test",
            keys=keys,
            trust=[trusted],
        )
        with TestClient(app, cookies={SESSION_COOKIE: AUDITOR}) as client:
            text = client.get("/audit/verify").text
        assert expected in text
        assert "non vérifiés" not in text
