"""The audit web page for the data-protection officer (server-rendered HTML, no build step, no JavaScript).

``/audit/login`` takes an API key (roles ``auditor`` or ``admin``) and keeps it in the ``gateway_session``
cookie (HttpOnly, SameSite=Strict, Secure over https); ``/audit`` searches the exchanges (by patient,
recipient, letter, dates) and shows the state of the chain; ``/audit/exchange/{letter}`` shows, per
recipient, what was sent, what was withheld and why (rule, reason, the consent version that decided)
and the delivery timeline; ``/audit/patient`` prints the data-subject access report.  Everything is
read from the audit log (:mod:`gateway.report`), which holds identifiers and reasons only — never
clinical content.  Every page view is itself audited, like the JSON audit API.  Templates live in
``gateway/templates`` and are rendered by Jinja2 with autoescaping on: identifiers and search fields
come from outside and are shown, never interpreted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from joserfc.jwk import ECKey
from sqlalchemy import func, select

from gateway import audit, report
from gateway.api.logins import RefusedLogins
from gateway.api.outcomes import ApiError
from gateway.auditlog import AuditLog, Filters, audit_table, verify
from gateway.model import Ident
from gateway.outbox import Delivery, Outbox

__all__ = ["SESSION_COOKIE", "install"]

SESSION_COOKIE = "gateway_session"
PAGE_SIZE = 50
_ALLOWED = frozenset({"auditor", "admin"})
_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_CATEGORIES = {"medical": "médical", "logistics": "logistique", "social": "social"}
_KINDS = {
    "disclose": "décision / envoi",
    "receive": "accusé de réception",
    "transmit": "transmission",
    "operation": "opération",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _when(stamp: Any) -> str:
    """An audit stamp (``2026-11-05T10:30:00.000000Z``) or a datetime, as ``2026-11-05 10:30:00 UTC``."""
    if stamp is None or stamp == "":
        return "—"
    if isinstance(stamp, datetime):
        moment = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    text = str(stamp)
    return f"{text[:10]} {text[11:19]} UTC" if len(text) >= 19 and text[10] == "T" else text


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(_TEMPLATES)), autoescape=True, auto_reload=False)
    env.filters["when"] = _when
    env.filters["category"] = lambda code: _CATEGORIES.get(str(code), str(code) or "—")
    env.filters["kind"] = lambda code: _KINDS.get(str(code), str(code))
    return env


def _day(value: str, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} : date attendue au format AAAA-MM-JJ") from None


def _stamp(day: date) -> str:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def install(
    app: FastAPI,
    *,
    log: AuditLog,
    outbox: Outbox | None,
    auditor: Any,
    client_of: Callable[..., str],
    keys: Mapping[str, frozenset[str]],
    trust: Sequence[ECKey] = (),
    logins: RefusedLogins | None = None,
) -> None:
    """Register ``/audit`` pages on ``app`` (auditors and admins; every page view is audited).

    ``auditor`` (the API's role dependency) is not used: a browser without a session is sent to the
    login form instead of getting a JSON 401/403.  ``trust`` are the gateway's public keys the signed
    checkpoints are checked against on ``/audit/verify`` (without them, only the chain is walked).
    ``logins`` audits a refused login like the API's other 401s (the app's, to share its coalescing)."""
    env = _environment()
    refused_logins = logins or RefusedLogins(log)

    def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = env.get_template(name).render(**context)
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def roles_of(request: Request) -> frozenset[str]:
        """The caller's roles (none: the browser is sent to the login form).  A session cookie or client
        certificate that does not authenticate — a stale or forged session, a revoked key — is a refused
        authentication, audited like the API's 401s; a first visit without credentials is not."""
        from gateway.api import auth
        from gateway.api.app import api_key

        key = api_key(request)
        try:
            return auth.authenticate(request, key, keys)
        except auth.Unauthenticated as refused:
            if refused.reason != "no-credentials":
                refused_logins.refused(request, refused.reason, refused.message, key)
            return frozenset()
        except ApiError:
            return frozenset()

    def record(request: Request, what: str, patient: str | None = None, *, outcome: str = "0",
               text: str | None = None, interaction: str = "search-type") -> None:  # fmt: skip
        now = datetime.now(UTC)
        ident = None
        if patient:
            system, _sep, value = patient.rpartition("|")
            ident = Ident(system, value)
        event = audit.rest_event(
            interaction,
            what,
            client_of(request),
            now.isoformat(timespec="seconds"),
            outcome=outcome,
            text=text,
            query=str(request.url.query) if interaction == "search-type" else None,
            patient=ident,
        )
        log.record([event], now)

    def guard(request: Request) -> Response | None:
        """None when the caller may read the audit; else where to send the browser."""
        roles = roles_of(request)
        if roles & _ALLOWED:
            return None
        if not roles:
            return RedirectResponse("/audit/login", status_code=303, headers=_HEADERS)
        path = request.url.path
        record(request, f"GET {path}", outcome="4", interaction="operation",
               text=f"refused: GET {path} needs the role auditor or admin")  # fmt: skip
        return render("error.html", 403, title="Accès refusé", message="Cette page est réservée aux auditeurs.")

    @app.get("/audit/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> Response:
        return render("login.html", error=None)

    @app.post("/audit/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > 4096:
            return render("login.html", 413, error="Requête trop longue.")
        form = parse_qs(raw.decode("utf-8", errors="replace"), keep_blank_values=True)
        key = (form.get("key") or [""])[0].strip()
        roles = keys.get(key, frozenset()) if key else frozenset()
        if not roles & _ALLOWED:
            why = "audit page login with a key that is not an auditor's or an admin's"
            refused_logins.refused(request, "login-refused" if key else "no-credentials", why, key or None)
            return render("login.html", 401, error="Clé inconnue ou sans le rôle auditeur.")
        answer = RedirectResponse("/audit", status_code=303, headers=_HEADERS)
        answer.set_cookie(
            SESSION_COOKIE,
            key,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return answer

    @app.post("/audit/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        answer = RedirectResponse("/audit/login", status_code=303, headers=_HEADERS)
        answer.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return answer

    def chain_status() -> dict[str, Any]:
        with log.reader.connect() as conn:
            count, head = conn.execute(select(func.count(), func.max(audit_table.c.seq))).one()
        checkpoints = log.checkpoints()
        latest = checkpoints[-1] if checkpoints else None
        return {
            "records": int(count or 0),
            "head": int(head or 0),
            "checkpoint": {"seq": latest[0], "at": latest[2], "kid": latest[3]} if latest else None,
            "checkpoints": len(checkpoints),
        }

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> Response:
        refused = guard(request)
        if refused is not None:
            return refused
        query = request.query_params
        q = {name: (query.get(name) or "").strip() for name in ("patient", "recipient", "letter", "from", "to")}
        page = int(query["page"]) if (query.get("page") or "").isdigit() else 1
        page = max(page, 1)
        error = None
        since = until = None
        try:
            start, end = _day(q["from"], "Du"), _day(q["to"], "Au")
            since = _stamp(start) if start else None
            until = _stamp(end + timedelta(days=1)) if end else None
        except ValueError as exc:
            error = str(exc)
        filters = Filters(
            patient=q["patient"] or None,
            recipient=q["recipient"] or None,
            letter=q["letter"] or None,
            since=since,
            until=until,
        )
        rows: list[dict[str, Any]] = []
        total = 0
        if error is None:
            where = [*log._where(filters), audit_table.c.letter_id.is_not(None)]
            first = func.min(audit_table.c.seq)
            with log.reader.connect() as conn:
                total = int(
                    conn.execute(select(func.count(func.distinct(audit_table.c.letter_id))).where(*where)).scalar() or 0
                )
                letters = [
                    str(r.letter_id)
                    for r in conn.execute(
                        select(audit_table.c.letter_id, first.label("first"))
                        .where(*where)
                        .group_by(audit_table.c.letter_id)
                        .order_by(first.desc())
                        .offset((page - 1) * PAGE_SIZE)
                        .limit(PAGE_SIZE)
                    )
                ]
            for letter_id in letters:
                exchange = report.for_letter(log, letter_id)
                if exchange is not None:
                    rows.append({"exchange": exchange, "recipients": list(exchange.recipients.values())})
        record(request, "audit page /audit", filters.patient)
        base = {k: v for k, v in q.items() if v}
        pages = max(1, -(-total // PAGE_SIZE))
        previous = f"/audit?{urlencode({**base, 'page': page - 1})}" if page > 1 else None
        following = f"/audit?{urlencode({**base, 'page': page + 1})}" if page < pages else None
        return render(
            "index.html",
            400 if error else 200,
            q=q,
            error=error,
            rows=rows,
            total=total,
            page=page,
            pages=pages,
            previous=previous,
            following=following,
            chain=chain_status(),
            patient_link=f"/audit/patient?{urlencode({'identifier': q['patient']})}" if q["patient"] else None,
        )

    @app.get("/audit/verify", response_class=HTMLResponse, include_in_schema=False)
    def verify_page(request: Request) -> Response:
        refused = guard(request)
        if refused is not None:
            return refused
        found = verify(log.engine, list(trust))
        problems = [p for p in found.problems if trust or p.kind != "forged-checkpoint"]
        record(request, "audit page /audit/verify")
        return render(
            "verify.html",
            report=found,
            problems=problems,
            first=problems[0] if problems else None,
            checked_signatures=bool(trust),
            chain=chain_status(),
        )

    @app.get("/audit/exchange/{letter_id}", response_class=HTMLResponse, include_in_schema=False)
    def exchange_page(request: Request, letter_id: str) -> Response:
        refused = guard(request)
        if refused is not None:
            return refused
        exchange = report.for_letter(log, letter_id)
        state = outbox.letter(letter_id) if outbox is not None else None
        record(request, f"audit page /audit/exchange/{letter_id}", exchange.patient if exchange else None)
        if exchange is None and state is None:
            return render(
                "error.html", 404, title="Échange introuvable", message=f"Aucun échange pour la lettre {letter_id}."
            )
        deliveries: dict[str, Delivery] = {d.recipient_id: d for d in (state or {}).get("deliveries", ())}
        views = list(exchange.recipients.values()) if exchange else []
        undecided = [d for rid, d in deliveries.items() if rid not in {v.recipient for v in views}]
        return render(
            "exchange.html",
            letter_id=letter_id,
            exchange=exchange,
            state=state,
            views=views,
            deliveries=deliveries,
            undecided=undecided,
        )

    @app.get("/audit/patient", response_class=HTMLResponse, include_in_schema=False)
    def patient_page(request: Request) -> Response:
        refused = guard(request)
        if refused is not None:
            return refused
        identifier = (request.query_params.get("identifier") or "").strip()
        found = report.for_patient(log, identifier) if identifier.strip("|") else []
        record(request, "audit page /audit/patient", identifier or None)
        return render(
            "patient.html",
            identifier=identifier,
            exchanges=found,
            generated=datetime.now(UTC),
        )
