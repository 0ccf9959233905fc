"""Refused authentications (every 401 of the API and of the audit page's login form, and every MLLP client
certificate the listener does not know): audited and counted.

Each refusal is counted (``gateway_auth_refused_total{reason}``) and written to the audit log as a
User Authentication AuditEvent (:func:`gateway.audit.authentication_event`) naming the method and route
template (never the query string), the caller as far as known (the hash of a presented key, the
certificate's fingerprint, or ``anonymous``), its address and why.

An unauthenticated caller must not be able to flood the audit log — every record is a hash-chained
write in the writer's transaction, which letters wait for — so refusals are coalesced per (client
address, reason): the first of a window is written at once, the others of the next ``window`` seconds
are only counted, and one record stands for them all (its ``refusals`` detail says how many) when the
window has passed and another refusal arrives, or at shutdown (:meth:`RefusedLogins.flush`).  The
counts of the records add up to the refusals.  Once ``max_keys`` windows are open, new addresses share
one window per reason (address ``*``), so memory stays bounded whatever the addresses.  Per process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from gateway import audit
from gateway.api import auth
from gateway.api.ops import route_template
from gateway.auditlog import AuditLog
from gateway.metrics import AUTH_REFUSALS, Metrics

__all__ = ["REASONS", "RefusedLogins"]

REASONS = AUTH_REFUSALS


@dataclass(slots=True)
class _Window:
    started: float  # monotonic: when the record that opened the window was written
    suppressed: int = 0  # refusals since, not written yet
    since: str = ""  # the first of them and the latest (UTC)
    until: str = ""
    what: str = ""  # the latest: method and route, who, why
    who: str = ""
    why: str = ""


class RefusedLogins:
    """Count every 401 and audit it, coalesced per (address, reason) — see the module docstring."""

    def __init__(
        self,
        log: AuditLog,
        metrics: Metrics | None = None,
        *,
        window: float = 60.0,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.window, self.max_keys, self.clock = log, window, max_keys, clock
        self.metrics = metrics
        self._open: dict[tuple[str, str], _Window] = {}  # in the order opened: the oldest first
        self._lock = threading.Lock()

    def refused(self, request: Request, reason: str, why: str, api_key: str | None) -> None:
        """One 401 answered to ``request``: ``reason`` one of :data:`REASONS`, ``why`` the answer's text,
        ``api_key`` the key presented (its hash names the caller; it is never written)."""
        scope = request.scope
        what = f"{scope.get('method')} {route_template(scope)}"
        who = "anonymous" if reason == "no-credentials" else auth.client_id(request, api_key)
        client: Any = scope.get("client")
        self.record(what, who, str(client[0]) if client else "unknown", reason, why)

    def record(self, what: str, who: str, address: str, reason: str, why: str) -> None:
        """One refused authentication outside an HTTP request (the MLLP listener's client certificates):
        ``what`` was tried, by ``who`` (never a secret), from ``address``; coalesced and counted alike."""
        if self.metrics is not None:
            self.metrics.login_refused(reason)
        now = datetime.now(UTC)
        stamp = now.isoformat(timespec="seconds")
        tick = self.clock()
        with self._lock:
            events = self._expired(tick)
            key = (address, reason)
            if key not in self._open and len(self._open) >= self.max_keys:
                key = ("*", reason)
            opened = self._open.get(key)
            if opened is None:
                self._open[key] = _Window(tick)
                events.append(audit.authentication_event(what, who, address, f"refused: {what} — {why}", stamp))
            else:
                opened.suppressed += 1
                opened.since = opened.since or stamp
                opened.until, opened.what, opened.who, opened.why = stamp, what, who, why
        if events:
            self.log.record(events, now)

    def flush(self) -> None:
        """Write the refusals still only counted (at shutdown)."""
        with self._lock:
            events = self._expired(None)
        if events:
            self.log.record(events, datetime.now(UTC))

    def _expired(self, tick: float | None) -> list[dict[str, Any]]:
        """Close the windows older than ``window`` (all of them if ``tick`` is None): a record for each
        one that counted refusals.  Called under the lock."""
        events = []
        while self._open:
            key = next(iter(self._open))
            opened = self._open[key]
            if tick is not None and tick - opened.started < self.window:
                break
            del self._open[key]
            if opened.suppressed:
                address = None if key[0] == "*" else key[0]
                text = (
                    f"{opened.suppressed} more refusal(s) from {address or 'many addresses'} ({key[1]}) between "
                    f"{opened.since} and {opened.until}, one record for them (at most one per {self.window:g} s "
                    f"per address and reason); latest: {opened.what} — {opened.why}"
                )
                events.append(
                    audit.authentication_event(opened.what, opened.who, address, text, opened.until, opened.suppressed)
                )
        return events
