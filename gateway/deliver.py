"""Stage — deliver: claim due deliveries from the outbox, cut each message at send time, seal, send.

The consent decision is taken now, with the consents valid now (an objection recorded after the
letter was accepted still applies).  Retries are bounded, spaced by exponential backoff with jitter
(tenacity's wait strategy) or the receiver's ``Retry-After``; a permanent refusal or exhausted retries
dead-letter the delivery (visible and replayable); one dead recipient never blocks the others.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tenacity import wait_exponential_jitter

from gateway import audit, crypt, label, package, seal, validate
from gateway.consent import ConsentStore
from gateway.directory import Directory, Endpoint, Recipient
from gateway.errors import GatewayError
from gateway.logs import get_logger
from gateway.mappings import Mappings
from gateway.outbox import Delivery, Finish, Outbox
from gateway.pipeline import Prepared, cut_for, prepare
from gateway.policy import policy_from
from gateway.route import Routed, Routing, route
from gateway.settings import Settings
from gateway.store import ResourceStore, StoreSnapshot
from gateway.transports import Outcome, Transport, transport_for
from gateway.transports.base import carries

__all__ = ["Deliverer", "RetryPolicy"]

_log = get_logger(__name__)


_FRESH_PER_BATCH = 4  # letters accepted here, claimed together in one batch
# What this process accepted stays its own (it holds the translation) while it lives: it renews the hold
# every _RENEW, each time for _HOLD, so another process takes the deliveries only _HOLD after it stopped
# (killed, or every delivery thread stuck); a letter waiting longer than _PATIENCE is no longer held, so
# an idle process helps one that has fallen that far behind (translating the letter again).
_HOLD = timedelta(seconds=5)
_PATIENCE = timedelta(seconds=10)
_WAITING = 1024
_CLAIMED = 256
_RENEW = timedelta(seconds=1)

# log level per outcome: what an operator must look at stands out from the steady flow
_LEVELS = {"failed-retrying": logging.WARNING, "dead-lettered": logging.ERROR}


def _kind(error: str | None) -> str | None:
    """What kind of failure, for a log line: the reason up to its first colon (``HTTP 503``, ``retries
    exhausted``, ``cannot be prepared now``...) — the details after it may quote a receiver's answer."""
    return error.split(":", 1)[0][:60] if error else None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    initial: float = 2.0  # seconds
    maximum: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_max_attempts, settings.retry_initial_seconds, settings.retry_max_seconds)

    def delay(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1`` (exponential with jitter, tenacity's strategy)."""
        wait = wait_exponential_jitter(multiplier=self.initial, max=self.maximum, jitter=self.initial)
        return float(wait(_Attempt(attempt)))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class _Attempt:
    attempt_number: int


def _send_sealed(
    transport: Transport,
    sealed: bytes,
    endpoint: Endpoint,
    message_id: str,
    now: datetime,
    trust: crypt.RecipientTrust | None = None,
) -> tuple[Outcome, str]:
    """Send the sealed message — encrypted for the recipient when its endpoint publishes a certificate —
    and say how it went (for the audit).  A certificate that cannot be used at ``now``, or a transport
    that cannot carry a JWE, or one not issued under ``trust``'s authorities (when the gateway has them),
    fails the delivery permanently: the message is never sent in clear instead."""
    if endpoint.certificate is None:
        return transport.send(sealed, endpoint.address, message_id), "signed, not encrypted (no recipient certificate)"
    try:
        if not carries(transport, crypt.JOSE):
            scheme = endpoint.address.split(":", 1)[0]
            raise crypt.CryptError(
                f"the endpoint publishes an encryption certificate but the {scheme} transport cannot carry a JWE"
            )
        key = crypt.recipient_key(endpoint.certificate, now, trust)
        token = crypt.encrypt(sealed, key)
    except crypt.CryptError as exc:
        return Outcome("permanent", f"not sent: {exc.message}"), "not sent in clear: the recipient requires encryption"
    outcome = transport.send(token, endpoint.address, message_id, content_type=crypt.JOSE)
    return outcome, f"signed and encrypted ({key.describe()})"


class Deliverer:
    """One delivery worker (several may run, in one or many processes, on the same database)."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        store: ResourceStore,
        mappings: Mappings,
        settings: Settings,
        signer: seal.Signer,
        transports: Mapping[str, Transport],
        retry: RetryPolicy = RetryPolicy(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.outbox, self.store, self.mappings, self.settings = outbox, store, mappings, settings
        self.signer, self.transports, self.retry, self.clock = signer, dict(transports), retry, clock
        self.worker = f"worker-{uuid.uuid4()}"
        # the authorities recipients' encryption certificates must chain to (GATEWAY_RECIPIENT_CA_FILE)
        self.trust = crypt.trust_from(settings.recipient_ca_file)
        self.snapshot = StoreSnapshot(store, policy_from(mappings))
        self._prepared: OrderedDict[str, Prepared] = OrderedDict()  # claimed lately (their retries too)
        # accepted here, not claimed yet (held for us), oldest first, each with its translation: however
        # long the backlog, up to _WAITING letters (~0.3 MB each), none is translated again when claimed
        self._fresh: OrderedDict[str, Prepared] = OrderedDict()
        self._lock = threading.Lock()
        outbox.holder = self.worker  # what this process accepts is held for this worker (renew_hold)
        self._hold = min(_HOLD, timedelta(seconds=settings.claim_lease_seconds))
        self._renew_at = datetime.min.replace(tzinfo=UTC)
        self._claiming = threading.Lock()  # a renewal and a claim by letter never skip each other's rows
        self._stop = threading.Event()
        self._work = threading.Event()

    def remember(self, letter_id: str, prepared: Prepared) -> None:
        """The API just accepted this letter in this process: keep its translation (it would be the same
        again) and wake the worker, so a letter is on its way within milliseconds, not a polling period."""
        with self._lock:
            self._fresh[letter_id] = prepared
            if len(self._fresh) > _WAITING:
                self._fresh.popitem(last=False)
        self.wake()

    def wake(self) -> None:
        self._work.set()

    def _letter(self, letter_id: str, batch: dict[str, Prepared]) -> Prepared:
        """The letter's translation: the batch's (accepted here, or used earlier in the batch), a recent
        one, or else translated again from the stored letter (accepted by another process, or long ago)."""
        known = batch.get(letter_id)
        if known is None:
            with self._lock:  # a letter accepted here may fall due before its turn (see _PATIENCE)
                known = self._prepared.get(letter_id) or self._fresh.get(letter_id)
        if known is not None:
            batch[letter_id] = known
            return known
        stored = self.outbox.letter_body(letter_id)
        assert stored is not None, "a delivery always has its letter"
        prepared = prepare(stored[0], name=f"letter-{letter_id}", mappings=self.mappings, settings=self.settings)
        with self._lock:
            self._keep(letter_id, prepared)
        batch[letter_id] = prepared
        return prepared

    def _keep(self, letter_id: str, prepared: Prepared) -> None:
        """Cache a claimed letter's translation (the most recent ``_CLAIMED``); call with the lock held."""
        self._prepared[letter_id] = prepared
        self._prepared.move_to_end(letter_id)
        while len(self._prepared) > _CLAIMED:
            self._prepared.popitem(last=False)

    def run_once(self, limit: int = 10, worker: str | None = None) -> int:
        """Claim and attempt the due deliveries, record their outcomes in one commit; how many were attempted.

        The directory and the consents are read once per batch, as stored when the batch starts (a
        consent recorded after the letter was accepted still applies)."""
        now = self.clock()
        worker = worker or self.worker
        lease = timedelta(seconds=self.settings.claim_lease_seconds)
        with self._lock:
            # a few letters per batch: their acknowledgements are recorded when the whole batch is done
            fresh = [self._fresh.popitem(last=False) for _ in range(min(_FRESH_PER_BATCH, len(self._fresh)))]
            for letter_id, prepared in fresh:
                self._keep(letter_id, prepared)
        claimed = self._claim_fresh(fresh, worker, now, 16 * limit, lease) if fresh else []
        if not claimed:
            claimed = self.outbox.claim(worker, now, limit, lease)
            if len(claimed) == limit:  # the limit may have cut a letter: take the rest of it, translated once
                letters = list(dict.fromkeys(d.letter_id for d in claimed))
                claimed += self.outbox.claim(worker, now, 16 * limit, lease, letters=letters)
        if not claimed:
            return 0
        directory, consents = self.snapshot.current()
        routings: dict[str, Routing] = {}
        batch = dict(fresh)
        outcomes = [self._guarded(delivery, directory, consents, routings, batch) for delivery in claimed]
        finished = self.clock()
        recorded = self.outbox.finish_many(outcomes, worker, finished)
        self._observe(claimed, outcomes, recorded, finished)
        return len(claimed)

    def _claim_fresh(
        self, fresh: list[tuple[str, Prepared]], worker: str, now: datetime, limit: int, lease: timedelta
    ) -> list[Delivery]:
        """Claim the deliveries of letters accepted here, first renewing (at most every ``_RENEW``) the
        hold on those still waiting; if the claim fails, the letters wait for the next one."""
        try:
            with self._claiming:
                if now >= self._renew_at:
                    self._renew_at = now + _RENEW
                    self.outbox.renew_hold(self.worker, now + self._hold, now - (_PATIENCE - self._hold))
                return self.outbox.claim(worker, now, limit, lease, letters=[letter_id for letter_id, _ in fresh])
        except Exception:
            with self._lock:
                for letter_id, prepared in reversed(fresh):
                    self._fresh[letter_id] = prepared
                    self._fresh.move_to_end(letter_id, last=False)
            raise

    def _observe(
        self, claimed: list[Delivery], outcomes: list[Finish], recorded: list[bool], finished: datetime
    ) -> None:
        """One log line per attempt (ids, attempt, outcome; the reason's kind, never its text) and the
        latency of each hand-over, from the letter queued for this recipient (the outbox counts the rest)."""
        for delivery, outcome, done in zip(claimed, outcomes, recorded, strict=True):
            handed_over = outcome.status in ("sent", "acknowledged")
            if done and handed_over and delivery.queued_at is not None:
                self.outbox.metrics.handed_over((finished - delivery.queued_at).total_seconds())
            _log.log(
                _LEVELS.get(outcome.status, logging.INFO) if done else logging.WARNING,
                "delivery attempt" if done else "delivery attempt not recorded: claim lost",
                letter_id=delivery.letter_id,
                message_id=delivery.message_id,
                recipient=delivery.recipient_id,
                attempt=delivery.attempts + 1,
                outcome=outcome.status,
                error_kind=_kind(outcome.error),
                retry_at=outcome.due_at.isoformat(timespec="seconds")
                if outcome.status == "failed-retrying" and outcome.due_at
                else None,
            )

    def _guarded(
        self,
        delivery: Delivery,
        directory: Directory,
        consents: ConsentStore,
        routings: dict[str, Routing],
        batch: dict[str, Prepared],
    ) -> Finish:
        """One attempt that cannot take the batch down: a letter the pipeline now refuses (mappings
        changed since it was accepted) is dead-lettered with the reason; an unexpected error is retried
        later like a transient failure, and logged with the message id only."""
        try:
            return self._attempt(delivery, directory, consents, routings, batch)
        except GatewayError as error:
            return self._failed(delivery, "dead-lettered", f"cannot be prepared now: {error.message}")
        except Exception as error:  # a bug must not stop delivery to everyone else
            _log.exception(
                "delivery failed unexpectedly",
                letter_id=delivery.letter_id,
                message_id=delivery.message_id,
                recipient=delivery.recipient_id,
                attempt=delivery.attempts + 1,
            )
            reason = f"internal error: {type(error).__name__}"
            if delivery.attempts + 1 >= self.retry.max_attempts:
                return self._failed(delivery, "dead-lettered", reason)
            wait = self.retry.delay(delivery.attempts + 1)
            return self._failed(delivery, "failed-retrying", reason, self.clock() + timedelta(seconds=wait))

    def _failed(self, delivery: Delivery, status: str, reason: str, due_at: datetime | None = None) -> Finish:
        """An attempt that sent nothing, audited as such (no content: the message id and the reason)."""
        event = audit.operation_event(
            f"MessageHeader/{delivery.message_id}",
            f"attempt {delivery.attempts + 1} for {delivery.recipient_id}: nothing sent — {reason}",
            "delivery worker",
            self.clock().isoformat(timespec="seconds"),
            outcome="8" if status == "dead-lettered" else "4",
        )
        return Finish(
            delivery.message_id,
            delivery.letter_id,
            status,
            delivery.recipient_id,
            error=reason,
            due_at=due_at,
            audit_events=[event],
        )

    def _attempt(
        self,
        delivery: Delivery,
        directory: Directory,
        consents: ConsentStore,
        routings: dict[str, Routing],
        batch: dict[str, Prepared],
    ) -> Finish:
        now = self.clock()
        recipient = directory.get(delivery.recipient_id)
        if recipient is None or recipient.endpoint is None:
            return self._failed(delivery, "dead-lettered", "recipient no longer in the directory, or without endpoint")
        if delivery.kind == "withdrawal":
            message, audited = self._withdrawal(delivery, recipient, now)
        else:
            prepared = self._letter(delivery.letter_id, batch)
            routing = routings.get(delivery.letter_id)
            if routing is None:
                routing = routings[delivery.letter_id] = route(prepared.resources, directory, prepared.policy)
            routed = next(
                (r for r in routing.routed if r.recipient.id == recipient.id),
                Routed(recipient, ("destinataire",)),
            )
            cut = cut_for(prepared, routed, now, consents, self.settings, replaces=delivery.replaces)
            if cut.message is None:
                return Finish(
                    delivery.message_id,
                    delivery.letter_id,
                    "withheld",
                    delivery.recipient_id,
                    error="consent allows nothing at send time",
                    audit_events=[cut.event],
                )
            message, audited = cut.message, cut.event
        if message["entry"][0]["resource"]["id"] != delivery.message_id:
            raise AssertionError("message identity must be stable across attempts")
        outcome, protection = _send_sealed(
            transport_for(recipient.endpoint.address, self.transports),
            seal.sign_bytes(message, self.signer, now.isoformat(timespec="seconds")),
            recipient.endpoint,
            delivery.message_id,
            now,
            self.trust,
        )
        event = {
            **audited,
            "outcomeDesc": f"{audited['outcomeDesc']}; attempt {delivery.attempts + 1}: {outcome.detail}; {protection}",
        }
        if outcome.kind in ("transient", "permanent"):
            event["outcome"] = "4" if outcome.kind == "transient" else "8"
        if outcome.kind in ("ok", "sent"):
            return Finish(
                delivery.message_id,
                delivery.letter_id,
                "acknowledged" if outcome.kind == "ok" else "sent",
                delivery.recipient_id,
                audit_events=[event],
            )
        if outcome.kind == "transient" and delivery.attempts + 1 < self.retry.max_attempts:
            wait = max(outcome.retry_after or 0.0, self.retry.delay(delivery.attempts + 1))
            return Finish(
                delivery.message_id,
                delivery.letter_id,
                "failed-retrying",
                delivery.recipient_id,
                error=outcome.detail,
                due_at=now + timedelta(seconds=wait),
                audit_events=[event],
            )
        reason = outcome.detail if outcome.kind == "permanent" else f"retries exhausted: {outcome.detail}"
        return Finish(
            delivery.message_id,
            delivery.letter_id,
            "dead-lettered",
            delivery.recipient_id,
            error=reason,
            audit_events=[event],
        )

    def _withdrawal(
        self, delivery: Delivery, recipient: Recipient, now: datetime
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The notice telling a recipient of an earlier version to set it aside (no patient data, so no
        consent decision: it only names the earlier message), and its AuditEvent.  The letter is not
        translated for it: its document key (the message identity) is read from the outbox."""
        assert delivery.replaces is not None, "a withdrawal always names the message it withdraws"
        letter = self.outbox.letter(delivery.letter_id)
        assert letter is not None, "a delivery always has its letter"
        recorded = now.isoformat(timespec="seconds")
        message = package.withdrawal(
            recipient,
            str(letter["document"]),
            recorded,
            package.Sender(endpoint=self.settings.public_url),
            label.rules_from(self.mappings).system,
            delivery.replaces,
        )
        for entry in message["entry"]:
            validate.check(entry["resource"], fhir_json=True)
        event = audit.operation_event(
            f"MessageHeader/{delivery.message_id}",
            f"withdrawal notice to {recipient.display}: message {delivery.replaces} of an earlier version is "
            "to be set aside (the new version is not addressed to this recipient); no patient data sent",
            "delivery worker",
            recorded,
        )
        return message, event

    def expire_unacknowledged(self, now: datetime | None = None) -> list[str]:
        """Give up waiting for the receipts older than ``GATEWAY_ACK_TIMEOUT_SECONDS`` (audited, dead-lettered)."""
        at = now or datetime.now(UTC)

        def event(message_id: str, recipient: str, detail: str) -> dict[str, object]:
            return audit.acknowledgement_event(
                message_id, False, detail, recipient, at.isoformat(timespec="seconds"), event="unacknowledged"
            )

        return self.outbox.expire_unacknowledged(at, timedelta(seconds=self.settings.ack_timeout_seconds), event)

    def run_forever(self, idle: float = 0.5, threads: int = 1) -> None:
        """Work until stopped, in ``threads`` threads (each claims its own batches: while one waits on the
        network or the disk, another prepares).  When nothing is due, sleep until woken (a new letter)
        or ``idle`` seconds (retries that fall due, letters accepted by another process)."""
        if threads > 1:
            pool = [
                threading.Thread(target=self._loop, args=(idle, f"{self.worker}-{i}"), daemon=True)
                for i in range(threads)
            ]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            return
        self._loop(idle, self.worker)

    def _loop(self, idle: float, worker: str) -> None:
        while not self._stop.is_set():
            try:
                attempted = self.run_once(worker=worker)
            except Exception:  # the database away for a moment: the claims' leases cover it
                _log.exception("delivery batch failed; retrying", worker=worker, retry_in_seconds=idle)
                attempted = 0
            if attempted == 0:
                self._work.wait(idle)
                self._work.clear()

    def stop(self) -> None:
        self._stop.set()
        self._work.set()

    def close(self) -> None:
        for transport in self.transports.values():
            transport.close()
