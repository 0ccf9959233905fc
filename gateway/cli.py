"""The ``gateway`` command.

Errors the user can act on (bad letter, bad mapping, bad settings) print one line — what and where —
on stderr and exit non-zero; they never show a traceback.  Exit codes: 0 ok, 1 usage, 2 refused input,
3 configuration problem, 4 dispatch done but incomplete (no médecin traitant, an actor unknown to the
directory or without endpoint: every such case is also in the audit).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from gateway.errors import GatewayError, IngestError, MappingError
from gateway.mappings import Mappings, load_mappings
from gateway.settings import Settings, SettingsError, loopback

if TYPE_CHECKING:
    from gateway.supervise import Listener

__all__ = ["main"]

EXIT_USAGE, EXIT_REFUSED, EXIT_CONFIG, EXIT_INCOMPLETE = 1, 2, 3, 4


def _err(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")


def _configure_logs(args: argparse.Namespace, default_format: str) -> None:
    """JSON lines on stderr (or readable lines with ``console``): ``--log-format`` / ``--log-level``, else
    ``GATEWAY_LOG_FORMAT`` / ``GATEWAY_LOG_LEVEL``.  ``--quiet`` drops the per-request line."""
    from gateway import logs

    settings = Settings.from_env()
    fmt = args.log_format or (settings.log_format if "log_format" in settings.model_fields_set else default_format)
    level = args.log_level or settings.log_level
    logs.configure("console" if fmt == "console" else "json", level, access_log=not getattr(args, "quiet", False))


def _log(name: str) -> Any:
    from gateway.logs import get_logger

    return get_logger(name)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_options(parser: argparse.ArgumentParser, default_format: str) -> None:
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        help=f"log lines on stderr: one JSON object each, or readable (default: GATEWAY_LOG_FORMAT or {default_format})",
    )
    parser.add_argument(
        "--log-level", choices=_LOG_LEVELS, help="least severe level logged (default: GATEWAY_LOG_LEVEL or INFO)"
    )


def _load(settings: Settings) -> Mappings:
    from gateway.translate.registry import SECTION_TRANSLATORS

    return load_mappings(settings.mappings_overlay, translators=SECTION_TRANSLATORS)


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    if getattr(args, "mappings", None):
        settings = settings.model_copy(update={"mappings_overlay": Path(args.mappings)})
    if getattr(args, "strict", False):
        settings = settings.model_copy(update={"strict_validation": True})
    return settings


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise IngestError(f"cannot read file: {exc.strerror}") from None


def _translate(args: argparse.Namespace) -> int:
    from gateway.pipeline import translate_letter

    settings = _settings(args)
    mappings = _load(settings)
    try:
        raw = _read(args.letter)
    except IngestError as exc:
        exc.where = type(exc.where)(source=args.letter)
        raise
    priors = []
    for prior in args.prior or []:
        try:
            priors.append((_read(prior), prior))
        except IngestError as exc:
            exc.where = type(exc.where)(source=prior)
            raise
    result = translate_letter(raw, name=args.letter, mappings=mappings, settings=settings, prior=priors)
    data = result.json()
    if args.output and args.output != "-":
        Path(args.output).write_bytes(data + b"\n")
    else:
        sys.stdout.buffer.write(data + b"\n")
    for issue in result.issues:
        where = f"{issue.where}: " if issue.where else ""
        _err(f"{issue.severity}: {where}{issue.text}")
    entries = result.bundle["entry"]
    changes = result.translation.built.changes
    summary = ", ".join(f"{n} {s}" for s, n in sorted(_count(c.status.value for c in changes).items()))
    _err(
        f"translated {args.letter}: {len(entries)} resources, {len(changes)} medication rows ({summary or 'none'})"
        f", {len(result.issues)} issue(s)"
    )
    return 0


def _read_json(path: str) -> dict[str, object]:
    from gateway.ingest.json import parse_json

    return parse_json(_read_named(path), path)


def _read_named(path: str) -> bytes:
    try:
        return _read(path)
    except IngestError as exc:
        exc.where = type(exc.where)(source=path)
        raise


def _dispatch(args: argparse.Namespace) -> int:
    from datetime import datetime

    from gateway.consent import MemoryConsentStore
    from gateway.directory import load_directory
    from gateway.pipeline import dispatch_letter
    from gateway.policy import policy_from
    from gateway.store import ResourceStore, SqlConsentStore, directory_from_store

    settings = _settings(args)
    mappings = _load(settings)
    policy = policy_from(mappings)
    if args.store:
        sql = ResourceStore(args.store)
        directory = directory_from_store(sql, policy)
        store: MemoryConsentStore | SqlConsentStore = SqlConsentStore(sql)
    else:
        if not args.directory:
            raise IngestError("--directory (or --store) is required")
        directory = load_directory(_read_json(args.directory), policy, args.directory)
        store = MemoryConsentStore()
        if args.consents:
            store.load_bundle(_read_json(args.consents), args.consents)
    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at.replace("Z", "+00:00"))
        except ValueError:
            raise IngestError(f"--at {args.at!r} is not an ISO 8601 date-time") from None
        if at.tzinfo is None:
            raise IngestError(f"--at {args.at!r} needs a time zone (e.g. +01:00 or Z)")
    priors = [(_read_named(p), p) for p in args.prior or []]
    result = dispatch_letter(
        _read_named(args.letter),
        name=args.letter,
        mappings=mappings,
        settings=settings,
        directory=directory,
        consents=store,
        prior=priors,
        at=at,
        fallback=args.fallback,
    )
    if isinstance(store, SqlConsentStore):  # decided: close the database (a PostgreSQL pool would leak)
        store.store.engine.dispose()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import orjson

    for recipient_id, message in result.messages.items():
        (out / f"{recipient_id}.json").write_bytes(orjson.dumps(message, option=orjson.OPT_INDENT_2) + b"\n")
    (out / "audit.json").write_bytes(orjson.dumps(result.audit, option=orjson.OPT_INDENT_2) + b"\n")
    for issue in result.translation.issues:
        _err(f"{issue.severity}: {issue.text}")
    for recipient_id, decision in result.decisions.items():
        view = result.views[recipient_id]
        sent = "sent" if recipient_id in result.messages else "NOTHING SENT"
        _err(
            f"{recipient_id}: {sent} ({decision.kind or 'kind unknown'}; allowed: "
            f"{', '.join(sorted(decision.categories)) or 'nothing'}; {len(view.withheld)} withheld)"
        )
    for event in result.routing.events:
        _err(f"{'exception' if event in result.routing.exceptions else 'note'}: {event.kind}: {event.text}")
    _err(
        f"dispatched {args.letter}: {len(result.messages)} message(s), audit in {out / 'audit.json'}"
        + ("" if result.complete else f"; INCOMPLETE: {len(result.routing.exceptions)} routing exception(s)")
    )
    return 0 if result.complete else EXIT_INCOMPLETE


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _mappings_check(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    overlay = Path(args.overlay) if args.overlay else settings.mappings_overlay
    mappings = load_mappings(
        overlay,
        translators=__import__("gateway.translate.registry", fromlist=["SECTION_TRANSLATORS"]).SECTION_TRANSLATORS,
    )
    from gateway.label import rules_from
    from gateway.policy import policy_from
    from gateway.redact import scanner_from

    rules_from(mappings)
    policy_from(mappings)
    scanner_from(mappings)
    overlaid = sorted(rel for rel, src in mappings.sources.items() if src != "builtin")
    _err(
        f"mappings ok: {len(mappings.codes)} code tables, {sum(len(t.sections) for t in mappings.sections.values())} "
        f"section rules, digest {mappings.digest[:16]}" + (f", overlay: {', '.join(overlaid)}" if overlaid else "")
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Check everything that can be checked once (settings, mappings, keys), then serve in this process
    or, with ``--processes N``, in N supervised workers sharing the port (:mod:`gateway.supervise`)."""
    _configure_logs(args, "json")
    from gateway.seal import generate_key, load_key
    from gateway.settings import refuse_demo_secrets
    from gateway.transports.mssante import SmtpSettings

    settings = Settings.from_env()
    mappings = _load(settings)  # refuse to start on a bad mapping
    smtp = SmtpSettings.from_env()  # None unless GATEWAY_SMTP_HOST: MSSanté endpoints are then refused, explained
    if not settings.api_keys:
        _log("gateway.serve").warning("no API key configured (GATEWAY_API_KEYS[_FILE]): every call will get 401")
    _check_senders(settings)
    if settings.tls_cert_file is None and not loopback(args.host):
        _log("gateway.serve").warning(
            "the API listens beyond this machine over plain HTTP: letters and API keys cross the network in "
            "clear unless a TLS proxy stands in front; or set GATEWAY_TLS_CERT_FILE",
            host=args.host,
        )
    key = load_key(_read_named(str(settings.signing_key_file))) if settings.signing_key_file else None
    refuse_demo_secrets(settings, key.thumbprint() if key is not None else None)  # production: own secrets only
    if key is None:
        _log("gateway.serve").warning("demo mode: no GATEWAY_SIGNING_KEY_FILE, signing with a throw-away key")
        key = generate_key()
    if args.mllp_port or settings.mllp_port:
        _mllp_tls(args, settings)  # checked before any worker starts
    processes = args.processes if args.processes is not None else settings.processes
    if not 1 <= processes <= 64:
        raise SettingsError(f"--processes must be between 1 and 64, not {processes}")
    if processes == 1:
        return _serve_process(args, settings, mappings, smtp, key)
    import shutil

    from gateway import metrics, migrate
    from gateway.store import make_engine
    from gateway.supervise import Listener, supervise

    engine = make_engine(settings.database_url)
    migrate.upgrade(engine)  # once, here: workers starting together would race to migrate
    engine.dispose()  # no connection may cross the fork
    port = Listener(args.host, args.port)
    shared = metrics.share_between_processes()  # counters summed over the workers, whichever one is scraped
    try:
        return supervise(processes, lambda index: _serve_process(args, settings, mappings, smtp, key, port, index))
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)


def _check_senders(settings: Settings) -> None:
    """Warn about ``GATEWAY_SENDER_ORGANIZATIONS`` entries no configured credential answers to (a typo
    would refuse a hospital's letters) and about senders it leaves out (refused, once it is set)."""
    from gateway.api.auth import certificate_name, key_name

    if not settings.sender_organizations:
        return
    senders = {key_name(k): roles for k, roles in settings.api_keys.items()}
    senders |= {certificate_name(f): roles for f, roles in settings.client_certs.items()}
    for name in sorted(settings.sender_organizations):
        facility = name.removeprefix("mllp:")
        known = name in senders if facility == name else not settings.mllp_senders or facility in settings.mllp_senders
        if not known:
            _log("gateway.serve").warning(
                "GATEWAY_SENDER_ORGANIZATIONS names a sender no API key, client certificate or MLLP facility "
                "answers to",
                sender=name,
            )
    for name, roles in sorted(senders.items()):
        if roles & {"his", "admin"} and name not in settings.sender_organizations:
            _log("gateway.serve").warning(
                "this client may push letters but is bound to no establishment in GATEWAY_SENDER_ORGANIZATIONS: "
                "its letters will be refused (403)",
                sender=name,
                roles="+".join(sorted(roles)),
            )


def _serve_process(
    args: argparse.Namespace,
    settings: Settings,
    mappings: Mappings,
    smtp: Any,
    key: Any,
    port: Listener | None = None,
    index: int = 0,
) -> int:
    """One gateway process: the API, its delivery worker and (worker 0 only) MLLP and housekeeping."""
    import logging
    import threading
    import time
    from datetime import UTC, datetime, timedelta

    import uvicorn

    from gateway.api import auth
    from gateway.api.app import create_app
    from gateway.deliver import Deliverer, RetryPolicy
    from gateway.mdn import inbox_from_env, mailbox_from_env
    from gateway.outbox import Outbox
    from gateway.seal import Signer
    from gateway.store import ResourceStore, make_engine
    from gateway.supervise import settle_heap
    from gateway.transports import Transport
    from gateway.transports.http import HttpTransport, tls_context
    from gateway.transports.mssante import SmtpTransport

    engine = make_engine(settings.database_url)
    store, outbox = ResourceStore(engine=engine), Outbox(engine, Signer(key))  # the key signs audit checkpoints
    client_auth = auth.ClientAuth(settings.auth_mode, settings.client_certs)  # type: ignore[arg-type]
    server_tls: dict[str, Any] = {}
    if settings.tls_cert_file is not None:
        server_tls = auth.uvicorn_tls_options(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file, client_auth.cert_reqs
        )
    elif client_auth.mode != "api-key":
        raise SettingsError("GATEWAY_AUTH=client-cert|both needs HTTPS: set GATEWAY_TLS_CERT_FILE")
    out_tls = (
        tls_context(settings.out_tls_ca_file, settings.out_tls_cert_file, settings.out_tls_key_file)
        if settings.out_tls_cert_file or settings.out_tls_ca_file
        else None
    )
    transports: dict[str, Transport] = {"http": HttpTransport(), "https": HttpTransport(tls=out_tls)}
    inbox = mailbox = None
    if smtp is not None:
        transports["mailto"] = SmtpTransport(smtp)
        if index == 0:
            inbox = inbox_from_env(outbox, smtp.sender)  # None unless GATEWAY_MDN_LISTEN
            mailbox = mailbox_from_env(outbox, smtp)  # None unless GATEWAY_MDN_IMAP_URL
            if mailbox is not None:
                mailbox.start()
    elif os.environ.get("GATEWAY_MDN_IMAP_URL"):
        raise SettingsError("GATEWAY_MDN_IMAP_URL reads the MSSanté application mailbox: set GATEWAY_SMTP_HOST too")
    worker = Deliverer(
        outbox=outbox,
        store=store,
        mappings=mappings,
        settings=settings,
        signer=Signer(key),
        transports=transports,
        retry=RetryPolicy.from_settings(settings),
    )

    def housekeeping() -> None:
        """Sign the audit head periodically (besides every 1000 records: a quiet log is covered too),
        dead-letter what waited too long for its receipt (so someone looks at it), and erase the content
        of letters past their retention period (``GATEWAY_LETTER_RETENTION_DAYS``)."""
        signed = time.monotonic()
        while True:
            time.sleep(min(settings.audit_checkpoint_seconds, 60.0))
            try:
                worker.expire_unacknowledged()
                if settings.letter_retention_days > 0:
                    now = datetime.now(UTC)
                    days = settings.letter_retention_days
                    outbox.erase_letters(now - timedelta(days=days), now, f"{days:g} days")
                if time.monotonic() - signed >= settings.audit_checkpoint_seconds:
                    outbox.log.checkpoint()
                    signed = time.monotonic()
            except Exception:  # the database away for a moment: try again next period
                logging.getLogger("gateway.audit").exception("housekeeping failed")

    _watch_certificates(outbox.metrics, settings, smtp, warn=index == 0)
    if index == 0:
        threading.Thread(target=housekeeping, name="housekeeping", daemon=True).start()
    threading.Thread(
        target=worker.run_forever, kwargs={"threads": settings.delivery_threads}, name="delivery", daemon=True
    ).start()
    listener = _mllp(args, settings, store, outbox, mappings, worker.remember) if index == 0 else None
    try:
        app = create_app(settings, store, outbox, mappings, on_accepted=worker.remember)
        auth.install(app, client_auth)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning" if args.quiet else "info",
            log_config=None,  # keep gateway.logs' JSON handler (uvicorn's dictConfig would add plain-text ones)
            access_log=False,  # its line carries the query string: gateway.api.ops logs each request instead
            **server_tls,
        )
        settle_heap()
        uvicorn.Server(config).run(sockets=[port.for_worker()] if port is not None else None)
    finally:
        if listener is not None:
            listener.close()
        worker.stop()
        if inbox is not None:
            inbox.stop()
        if mailbox is not None:
            mailbox.stop()
    return 0


def _watch_certificates(metrics: Any, settings: Settings, smtp: Any, *, warn: bool) -> None:
    """Export when each certificate the gateway presents expires (``/metrics``), and say so at start when
    one expires within 30 days or has expired: an IGC-Santé renewal takes weeks."""
    from datetime import UTC, datetime, timedelta

    expiries = metrics.certificates(
        {
            "server": settings.tls_cert_file,  # the API's, and the MLLP listener's over TLS
            "recipients-client": settings.out_tls_cert_file,
            "mssante-client": os.environ.get("GATEWAY_SMTP_CERT_FILE") if smtp is not None else None,
            "smime-signing": smtp.smime_cert_file if smtp is not None else None,
            "mailbox-client": os.environ.get("GATEWAY_MDN_IMAP_CERT_FILE") if smtp is not None else None,
        }
    )
    now = datetime.now(UTC)
    for name, expires in sorted(expiries.items()) if warn else ():
        if expires - now < timedelta(days=30):
            _log("gateway.serve").warning(
                "certificate expires soon" if expires > now else "certificate EXPIRED",
                certificate=name,
                expires=expires.isoformat(timespec="seconds"),
            )


def _mllp(
    args: argparse.Namespace, settings: Settings, store: Any, outbox: Any, mappings: Mappings, remember: Any
) -> Any:
    """The HL7 v2 (MLLP) listener beside the HTTP API when ``--mllp-port`` is given: the same intake,
    the same delivery worker."""
    port = args.mllp_port or settings.mllp_port
    if port is None:
        return None
    from gateway.api.logins import RefusedLogins
    from gateway.intake import Intake
    from gateway.mllp import MllpListener

    listener = MllpListener(
        Intake(settings, store, outbox, mappings, on_accepted=remember, source="mllp"),
        host=args.mllp_host or settings.mllp_host,
        port=port,
        senders=args.mllp_sender or sorted(settings.mllp_senders) or None,
        tls=_mllp_tls(args, settings),
        certificates=settings.client_certs,
        logins=RefusedLogins(outbox.log, outbox.metrics),
        metrics=outbox.metrics,
    )
    listener.start_in_thread()  # logs where it listens
    return listener


def _mllp_tls(args: argparse.Namespace, settings: Settings) -> Any:
    """The MLLP listener's TLS context (None for plain MLLP), or a SettingsError saying what is missing."""
    if (args.mllp_tls or settings.mllp_tls) != "client-cert":
        return None
    from gateway.mllp import his_certificates, server_tls_context

    if settings.tls_cert_file is None or settings.tls_ca_file is None:
        raise SettingsError(
            "GATEWAY_MLLP_TLS=client-cert serves the API's certificate and checks clients against its CAs: "
            "set GATEWAY_TLS_CERT_FILE (and GATEWAY_TLS_KEY_FILE) and GATEWAY_TLS_CA_FILE"
        )
    his_certificates(settings.client_certs)
    return server_tls_context(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)


def _receiver(args: argparse.Namespace) -> int:
    _configure_logs(args, "console")
    import uvicorn
    from joserfc.jwk import ECKey

    from gateway.keys import load_public_keys
    from gateway.receiver import create_receiver

    keys: list[ECKey] = []
    for path in args.trust or []:  # a JWK, a PEM, or a JWKS keyring (keys from before a rotation too)
        keys.extend(load_public_keys(_read_named(path), path))
    if not keys:
        _log("gateway.receiver").warning("no --trust key: message signatures are NOT checked")
    from gateway import crypt
    from gateway.receiver import tls_server_options

    decryption = [crypt.load_private_key(_read_named(p)) for p in args.decrypt_key or []]
    tls = tls_server_options(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else {}
    endpoint = f"{'https' if tls else 'http'}://{args.host}:{args.port}/fhir"
    app = create_receiver(args.db, keys, endpoint=endpoint, decryption_keys=decryption)
    from gateway.supervise import settle_heap

    settle_heap()
    level = (args.log_level or Settings.from_env().log_level).lower()  # uvicorn's request lines follow it
    uvicorn.run(app, host=args.host, port=args.port, log_level=level, log_config=None, **tls)
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    """Operators: what could not be delivered, and putting it back in the queue once the cause is fixed."""
    from datetime import UTC, datetime

    from gateway import audit
    from gateway.outbox import Outbox
    from gateway.store import make_engine

    outbox = Outbox(make_engine(Settings.from_env().database_url))
    dead = outbox.deliveries("dead-lettered")
    if args.action == "list":
        for d in dead:
            sys.stdout.write(
                f"{d.message_id}  letter {d.letter_id}  {d.recipient_id}  {d.attempts} attempts  {d.last_error or ''}\n"
            )
        _err(f"{len(dead)} dead-lettered deliveries")
        return 0
    wanted = {d.message_id for d in dead} if args.all else set(args.message_ids)
    if not wanted:
        _err("nothing to replay: give message ids or --all")
        return 2
    now = datetime.now(UTC)
    from gateway.progress import bar

    replayed = []
    with bar(f"replaying {len(wanted)} deliveries", len(wanted)) as tick:
        for m in sorted(wanted):
            if outbox.replay(m, now):
                replayed.append(m)
            tick()
    if replayed:
        who = f"cli:{os.environ.get('USER', 'operator')}"
        outbox.audit(
            [
                audit.operation_event(
                    f"MessageHeader/{m}", f"replay requested by {who}", who, now.isoformat(timespec="seconds")
                )
                for m in replayed
            ]
        )
    missing = sorted(wanted - set(replayed))
    for m in missing:
        _err(f"not dead-lettered (or unknown): {m}")
    _err(f"{len(replayed)} replayed, {len(missing)} not found")
    return 0 if not missing else 1


def _audit(args: argparse.Namespace) -> int:
    """``gateway audit verify``: check the whole chain and the signed checkpoints (exit 1 on the first
    broken record, named); ``gateway audit checkpoint``: sign the current head now."""
    from gateway.store import make_engine

    settings = Settings.from_env()
    engine = make_engine(args.url or settings.database_url)
    try:
        return _audit_on(args, settings, engine)
    finally:
        engine.dispose()


def _audit_on(args: argparse.Namespace, settings: Settings, engine: Any) -> int:
    import time

    from gateway.auditlog import AuditLog, verify
    from gateway.seal import Signer, load_key

    own = load_key(_read_named(str(settings.signing_key_file))) if settings.signing_key_file else None
    if args.action == "checkpoint":
        if own is None:
            raise SettingsError("a checkpoint is signed with the gateway key: set GATEWAY_SIGNING_KEY_FILE")
        from gateway import migrate

        migrate.upgrade(engine)
        head = AuditLog(engine, Signer(own)).checkpoint()
        sys.stdout.write(
            "empty log: nothing to sign\n" if head is None else f"checkpoint at seq {head[0]}: {head[1]}\n"
        )
        return 0
    from gateway.keys import load_public_keys

    # a JWK, a PEM, or a JWKS keyring: a chain whose checkpoints span a key rotation verifies with the keyring
    trusted = [k for path in args.trust or [] for k in load_public_keys(_read_named(path), path)]
    keys = trusted or ([own] if own is not None else [])
    if not keys:
        _err("warning: no --trust key and no GATEWAY_SIGNING_KEY_FILE: checkpoints cannot be checked")
    expect = None
    if args.expect:
        seq, _sep, value = args.expect.partition(":")
        if not seq.isdigit() or len(value) != 64:
            _err("--expect takes SEQ:HASH (the 64-hex hash of a checkpoint you kept)")
            return EXIT_USAGE
        expect = (int(seq), value.lower())
    started = time.perf_counter()
    report = verify(engine, keys, expect=expect)
    elapsed = time.perf_counter() - started
    rate = report.records / elapsed if elapsed > 0 else 0.0
    out = sys.stdout
    out.write(
        f"{report.records} records checked in {elapsed:.2f} s ({rate:,.0f}/s); head seq {report.last_seq} {report.head}\n"
    )
    if report.latest_checkpoint:
        seq, hash_, at, kid = report.latest_checkpoint
        out.write(
            f"{report.checkpoints} checkpoint(s); latest at seq {seq} signed {at} by key {kid}: keep {seq}:{hash_} "
            f"elsewhere; {report.unsigned_tail} record(s) after it are covered by the chain only\n"
        )
    else:
        out.write(f"{report.checkpoints} checkpoint(s): the log is covered by the chain only\n")
    if report.ok:
        out.write("chain intact\n")
        return 0
    first = report.problems[0]
    out.write(f"CHAIN BROKEN at record {first.seq}: {first.kind}: {first.text}\n")
    for problem in report.problems[1:]:
        out.write(f"  also: record {problem.seq}: {problem.kind}: {problem.text}\n")
    return 1


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    settings = Settings.from_env()
    return run_demo(_load(settings), settings, Path(args.out))


def _db(args: argparse.Namespace) -> int:
    """Migrate or inspect the schema by hand (``gateway serve`` also upgrades on start)."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway import migrate
    from gateway.store import make_engine

    engine = make_engine(args.url or Settings.from_env().database_url)
    try:
        if args.action == "upgrade":
            migrate.upgrade(engine)
        revision = migrate.current(engine)
    except SQLAlchemyError as exc:  # unreachable server, bad credentials, a revision this version does not know
        cause = getattr(exc, "orig", None) or exc
        _err(f"configuration error: database: {str(cause).strip().splitlines()[0]}")
        return EXIT_CONFIG
    finally:
        engine.dispose()
    sys.stdout.write(f"{revision or 'none'} (head {migrate.head()})\n")
    return 0 if revision == migrate.head() else EXIT_CONFIG


class _Parser(argparse.ArgumentParser):
    """argparse, with the CLI's exit code for a usage error (1; argparse's own 2 means "refused" here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gateway", description="FHIR messaging gateway for hospital discharge letters")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("translate", help="translate a discharge letter into one FHIR R4 collection Bundle")
    tr.add_argument("letter", help="the letter: CI-SIS LDL-SES CDA, HL7 C-CDA, or FHIR document Bundle (JSON)")
    tr.add_argument(
        "--prior",
        action="append",
        metavar="PRIOR",
        help="admission / prior medication list: LDL-EES, VSM, C-CDA, FHIR List or Bundle (repeatable)",
    )
    tr.add_argument("-o", "--output", metavar="OUT.json", help="write the Bundle here (default: stdout)")
    tr.add_argument(
        "--mappings", metavar="DIR", help="site overlay directory for mappings/ (or GATEWAY_MAPPINGS_OVERLAY)"
    )
    tr.add_argument("--strict", action="store_true", help="also validate every resource with the fhir.resources models")
    tr.set_defaults(handler=_translate)
    dp = sub.add_parser(
        "dispatch", help="route, apply consent, redact and package one letter for every recipient (no network)"
    )
    dp.add_argument("letter")
    dp.add_argument(
        "--directory",
        required=True,
        metavar="DIRECTORY.json",
        help="FHIR Bundle of Organization / Practitioner / PractitionerRole / Endpoint",
    )
    dp.add_argument(
        "--consents", metavar="CONSENTS.json", help="FHIR Bundle of Consent (all versions) and legal representatives"
    )
    dp.add_argument("--out", required=True, metavar="DIR", help="writes DIR/<recipient-id>.json and DIR/audit.json")
    dp.add_argument("--prior", action="append", metavar="PRIOR", help="admission / prior medication list (repeatable)")
    dp.add_argument("--at", metavar="DATETIME", help="decide with the consents valid at this instant (default: now)")
    dp.add_argument(
        "--fallback", metavar="REF", help="directory entry receiving what cannot be routed (overrides policy.yaml)"
    )
    dp.add_argument("--mappings", metavar="DIR", help="site overlay directory for mappings/")
    dp.add_argument("--store", metavar="URL", help="read directory and consents from the gateway's database instead")
    dp.set_defaults(handler=_dispatch)
    sv = sub.add_parser("serve", help="run the HTTP API (consents, directory; OpenAPI at /docs)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--quiet", action="store_true", help="no access log (benchmarks)")
    sv.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="gateway processes sharing the port, one per core (GATEWAY_PROCESSES, default 1)",
    )
    _log_options(sv, "json")
    sv.add_argument(
        "--mllp-port",
        type=int,
        metavar="PORT",
        help="also take HL7 v2 MDM/ORU letters over MLLP here (GATEWAY_MLLP_PORT)",
    )
    sv.add_argument("--mllp-host", help="address of the MLLP listener (GATEWAY_MLLP_HOST, default 127.0.0.1)")
    sv.add_argument(
        "--mllp-sender", action="append", metavar="FACILITY", help="allowed MSH-4 sending facility (repeatable)"
    )
    sv.add_argument(
        "--mllp-tls",
        choices=("off", "client-cert"),
        help="MLLP over TLS with client certificates required (GATEWAY_MLLP_TLS, default off)",
    )
    sv.set_defaults(handler=_serve)
    rx = sub.add_parser("receiver", help="run a reference FHIR messaging recipient ($process-message)")
    rx.add_argument("--host", default="127.0.0.1")
    rx.add_argument("--port", type=int, default=8090)
    rx.add_argument("--db", default="sqlite:///receiver.db", help="where received messages are kept")
    _log_options(rx, "console")
    rx.add_argument("--trust", action="append", metavar="KEY.jwk", help="public JWK of a trusted sender (repeatable)")
    rx.add_argument(
        "--decrypt-key", action="append", metavar="KEY", help="private key (PEM/JWK) to decrypt JWE messages"
    )
    rx.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (needs --tls-key, --tls-ca)")
    rx.add_argument("--tls-key", metavar="PEM")
    rx.add_argument("--tls-ca", metavar="PEM", help="CAs whose client certificates may connect (mutual TLS)")
    rx.set_defaults(handler=_receiver)
    db = sub.add_parser("db", help="the database schema: upgrade it to this version, or show its revision")
    db.add_argument(
        "action",
        choices=("upgrade", "current"),
        help="upgrade: migrate to the latest revision (idempotent, safe from several processes); "
        "current: print the revision (exit 3 if not the latest)",
    )
    db.add_argument("--url", metavar="URL", help="database URL (default: GATEWAY_DATABASE_URL)")
    db.set_defaults(handler=_db)
    dl = sub.add_parser("dead-letters", help="list dead-lettered deliveries, or put them back in the queue")
    dl.add_argument("action", choices=("list", "replay"))
    dl.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID", help="MessageHeader ids to replay")
    dl.add_argument("--all", action="store_true", help="replay every dead-lettered delivery")
    dl.set_defaults(handler=_dead_letters)
    au = sub.add_parser("audit", help="check the tamper-evident audit log, or sign a checkpoint of it now")
    au.add_argument(
        "action",
        choices=("verify", "checkpoint"),
        help="verify: walk the whole chain and the signed checkpoints, name the first broken record (exit 1); "
        "checkpoint: sign the current head with the gateway key",
    )
    au.add_argument("--url", metavar="URL", help="database URL (default: GATEWAY_DATABASE_URL)")
    au.add_argument(
        "--trust", action="append", metavar="KEY", help="gateway public key(s) (JWK/PEM) that sign checkpoints"
    )
    au.add_argument("--expect", metavar="SEQ:HASH", help="a checkpoint kept outside the gateway: the log must hold it")
    au.set_defaults(handler=_audit)
    dm = sub.add_parser("demo", help="translate the embedded sample letters and show the GP's change tables")
    dm.add_argument("--out", default="demo-out", help="directory for the output Bundles (default: demo-out)")
    dm.set_defaults(handler=_demo)
    mp = sub.add_parser("mappings", help="check the mapping tables (and an overlay) and exit")
    mp.add_argument("overlay", nargs="?", help="overlay directory to check with the built-in tables")
    mp.set_defaults(handler=_mappings_check)
    from gateway import operate

    operate.add_parsers(sub)  # keys generate|rotate|show, directory import, consents import
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except IngestError as exc:
        _err(f"refused: {exc.one_line()}")
        return EXIT_REFUSED
    except (MappingError, SettingsError) as exc:
        _err(f"configuration error: {exc.one_line()}")
        return EXIT_CONFIG
    except GatewayError as exc:
        _err(f"error: {exc.one_line()}")
        return EXIT_REFUSED
    except OSError as exc:  # an output we cannot write, a path we cannot create
        _err(f"error: {exc.filename or ''}: {exc.strerror or exc}".replace(": :", ":"))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
