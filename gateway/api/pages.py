"""The audit web page for the data-protection officer (server-rendered HTML, no build step).

Placeholder: :func:`install` registers the pages; filled in by the audit-page work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI

from gateway.auditlog import AuditLog
from gateway.outbox import Outbox

__all__ = ["SESSION_COOKIE", "install"]

SESSION_COOKIE = "gateway_session"


def install(
    app: FastAPI,
    *,
    log: AuditLog,
    outbox: Outbox | None,
    auditor: Any,
    client_of: Callable[..., str],
    keys: Mapping[str, frozenset[str]],
) -> None:
    """Register ``/audit`` pages on ``app`` (auditors and admins; every page view is audited)."""
