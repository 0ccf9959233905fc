"""Prometheus metrics: what operators alert on, with no patient data and no ids in any label.

One :class:`Metrics` per :class:`~gateway.outbox.Outbox` (its own registry, not the process-wide
default: tests build several gateways in one process).  Counters are per process — letters accepted
or refused, delivery attempts, retries, dead letters — and are summed across gateway processes by
Prometheus.  What is *in* the outbox (messages by status, queue depth) is read from the database at
scrape time instead, so every process reports the same, true figure (aggregate those with ``max``,
not ``sum``); two cheap queries per scrape (:meth:`~gateway.outbox.Outbox.counts`).

Under ``gateway serve --processes N`` a scrape reaches one worker, so the counters are kept in
prometheus_client's multiprocess files (:func:`share_between_processes`, set by the supervisor before
it forks) and every worker reports the sum over all of them, restarts included.

Labels come from closed sets only (a source, a FHIR issue code, a delivery state), so the number of
series stays small whatever the traffic.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "AUTH_REFUSALS",
    "LATENCY_BUCKETS",
    "Metrics",
    "certificate_expiry",
    "refusal_reason",
    "share_between_processes",
]

_MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes() -> str | None:
    """Keep the counters of every process of this gateway in one directory (prometheus_client's
    multiprocess mode); must run before the workers are forked.  The directory is
    ``PROMETHEUS_MULTIPROC_DIR`` if set (the operator empties it between runs), else a fresh one,
    returned so that the caller removes it at the end."""
    import tempfile

    from prometheus_client import values

    created = None
    if not os.environ.get(_MULTIPROCESS):
        created = os.environ[_MULTIPROCESS] = tempfile.mkdtemp(prefix="gateway-metrics-")
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # chosen at its import, before this
    return created


# from a same-process acknowledgement (tens of ms) to a mail relay and a retried outage (hours)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)
# why a call got a 401 (gateway.api.logins): a closed set, as every label here
AUTH_REFUSALS = ("invalid-api-key", "unknown-certificate", "no-credentials", "login-refused")
_ISSUE_CODE = re.compile(r"^[a-z][a-z-]{1,40}$")
_REFUSED = re.compile(r"^refused \(([a-z][a-z-]{1,40})\)")


class Counted(Protocol):
    """What the scrape-time collector reads (the outbox): deliveries per status (every status, 0
    included), and how many are due now."""

    def counts(self, now: datetime) -> tuple[Mapping[str, int], int]: ...


def refusal_reason(event: Mapping[str, Any]) -> str | None:
    """The FHIR issue code of a refusal AuditEvent (:func:`gateway.audit.refusal_event`), else None.

    The refusal is counted where it is audited (``Outbox.audit``) so every door — HTTP today, MLLP
    tomorrow — is counted without each having to remember to."""
    kind = event.get("type")
    if not isinstance(kind, Mapping) or kind.get("code") != "110107" or event.get("outcome") != "4":
        return None
    found = _REFUSED.match(str(event.get("outcomeDesc", "")))
    return found.group(1) if found else None


class _OutboxCollector(Collector):
    """``gateway_messages{status}``, ``gateway_queue_depth`` and ``gateway_database_up``, read at scrape time."""

    def __init__(self, outbox: Counted) -> None:
        self.outbox = outbox

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families depend on the database answering: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy.exc import SQLAlchemyError

        from gateway.logs import get_logger

        up = GaugeMetricFamily("gateway_database_up", "1 if the outbox could be read for this scrape")
        try:
            by_status, due = self.outbox.counts(datetime.now(UTC))
        except SQLAlchemyError as exc:
            get_logger("gateway.metrics").warning("outbox not readable for metrics", exc_info=exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        messages = GaugeMetricFamily(
            "gateway_messages", "Messages (deliveries) in the outbox by status", labels=["status"]
        )
        for status, count in by_status.items():  # every state, 0 included (the outbox lists them all)
            messages.add_metric([status], count)
        yield messages
        yield GaugeMetricFamily(
            "gateway_queue_depth", "Deliveries due now (queued or failed-retrying, due time passed)", value=due
        )


def certificate_expiry(path: str | os.PathLike[str]) -> datetime | None:
    """When the first certificate of a PEM file (the leaf of a chain) expires; None if there is none to read."""
    from cryptography import x509

    try:
        found = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return found[0].not_valid_after_utc if found else None


class _CertificateCollector(Collector):
    """``gateway_certificate_expiry_timestamp_seconds{certificate}``: when each certificate the gateway
    presents expires, as read when the process started (what it uses until it restarts)."""

    def __init__(self, expiries: Mapping[str, datetime]) -> None:
        self.expiries = dict(expiries)

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gateway_certificate_expiry_timestamp_seconds",
            "When each certificate the gateway presents expires (Unix time): alert weeks before, a renewed "
            "IGC-Santé certificate takes time to obtain",
            labels=["certificate"],
        )
        for name, expires in sorted(self.expiries.items()):
            family.add_metric([name], expires.timestamp())
        yield family


class Metrics:
    """The gateway's counters and histogram, in a registry of their own (see the module docstring)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` series: they double the output and nobody queries them
        self.registry = CollectorRegistry(auto_describe=True)
        self._watched = False
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()
        self.accepted = Counter(
            "gateway_letters_accepted", "Letters accepted (stored for delivery)", ["source"], registry=self.registry
        )
        self.refused = Counter(
            "gateway_letters_refused", "Letters refused, by FHIR issue code", ["reason"], registry=self.registry
        )
        self.attempts = Counter(
            "gateway_delivery_attempts",
            "Delivery attempts recorded, by the state they left the delivery in",
            ["outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "gateway_delivery_retries", "Attempts that failed and were scheduled again", registry=self.registry
        )
        self.dead_letters = Counter(
            "gateway_dead_letters",
            "Deliveries dead-lettered (retries exhausted, permanent refusal, negative acknowledgement)",
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_delivery_latency_seconds",
            "From the letter queued for a recipient to its message handed over (sent or acknowledged)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.auth_refused = Counter(
            "gateway_auth_refused",
            "Calls refused for want of valid credentials (401), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.mailbox_reads = Counter(
            "gateway_mailbox_reads",
            "Reads of the MSSanté application mailbox (GATEWAY_MDN_IMAP_URL), by outcome (ok, failed): alert "
            "when none succeeds for a while (an expired certificate, a changed password: receipts pile up)",
            ["outcome"],
            registry=self.registry,
        )
        self.receipts = Counter(
            "gateway_mailbox_mails",
            "Mails read from the application mailbox, by what they did (acknowledged, dead-lettered, ignored, refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.mllp_handshakes = Counter(
            "gateway_mllp_tls_failures",
            "MLLP-over-TLS handshakes that failed, by kind: refused (no certificate, another CA, an expired one, "
            "not TLS at all: alert, a HIS may be locked out) or abandoned (a probe that said nothing, a stall)",
            ["kind"],
            registry=self.registry,
        )
        self.accepted.labels("http")  # present at 0 from the start: rate() and increase() need a first sample
        for reason in AUTH_REFUSALS:
            self.auth_refused.labels(reason)

    def exposition(self) -> CollectorRegistry:
        """What ``/metrics`` shows: this registry, or with several processes the counters summed over
        all of them plus this process's read of the outbox."""
        if not os.environ.get(_MULTIPROCESS):
            return self.registry
        from prometheus_client.multiprocess import MultiProcessCollector

        shown = CollectorRegistry()
        MultiProcessCollector(shown)  # type: ignore[no-untyped-call]
        for collector in self._collectors:
            shown.register(collector)
        return shown

    def watch(self, outbox: Counted) -> None:
        """Report ``outbox``'s contents at scrape time (once per registry)."""
        with self._lock:
            if not self._watched:
                collector = _OutboxCollector(outbox)
                self.registry.register(collector)
                self._collectors.append(collector)
                self._watched = True

    def certificates(self, paths: Mapping[str, str | os.PathLike[str] | None]) -> dict[str, datetime]:
        """Report when the certificates in use expire (``paths``: a closed set of names → PEM files, None for
        one not configured); the expiries read, by name."""
        expiries = {name: found for name, path in paths.items() if path and (found := certificate_expiry(path))}
        collector = _CertificateCollector(expiries)
        with self._lock:
            self.registry.register(collector)
            self._collectors.append(collector)
        return expiries

    def letter_accepted(self, source: str) -> None:
        self.accepted.labels(source).inc()

    def letter_refused(self, reason: str) -> None:
        self.refused.labels(reason if _ISSUE_CODE.match(reason) else "other").inc()

    def login_refused(self, reason: str) -> None:
        self.auth_refused.labels(reason if reason in AUTH_REFUSALS else "other").inc()

    def attempt_recorded(self, status: str) -> None:
        self.attempts.labels(status).inc()  # one of the outbox's STATES (finish_many checks)
        if status == "failed-retrying":
            self.retries.inc()
        elif status == "dead-lettered":
            self.dead_letters.inc()

    def mllp_handshake_failed(self, refused: bool) -> None:
        self.mllp_handshakes.labels("refused" if refused else "abandoned").inc()

    def mailbox_watched(self) -> None:
        """A mailbox poller runs in this process: its read counters exist from 0 (for ``increase()``)."""
        for outcome in ("ok", "failed"):
            self.mailbox_reads.labels(outcome)

    def mailbox_read(self, ok: bool, results: Iterable[str] = ()) -> None:
        self.mailbox_reads.labels("ok" if ok else "failed").inc()
        for status in results:  # an MdnResult status: a closed set
            self.receipts.labels(status).inc()

    def handed_over(self, seconds: float) -> None:
        self.latency.observe(max(seconds, 0.0))
