"""Operator commands: ``gateway keys generate|rotate|show``, ``gateway directory import``,
``gateway consents import``.

Kept apart from :mod:`gateway.cli` so the command line stays thin wiring; the work is in
:mod:`gateway.keys` and :mod:`gateway.imports`.  Summaries go to stdout (what a script reads),
refusals and warnings to stderr; exit codes are the CLI's: 0 done, 1 usage, 2 refused input, 3
configuration (an unreachable or unknown database, a bad mapping).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.errors import IngestError, Where

__all__ = ["add_parsers", "operator"]

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_CONFIG = 0, 1, 2, 3
MAX_WARNINGS = 20  # every refusal is listed (each must be fixed); warnings past this are counted


def _out(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")


def operator() -> str:
    """Who the audit names for a command-line change (as ``gateway dead-letters replay`` does)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (a container)
        return "cli:operator"


# -- keys ------------------------------------------------------------------------------------------------
def _keys(args: argparse.Namespace) -> int:
    from gateway import keys

    if args.action == "generate":
        directory = Path(args.out or args.dir or ".")
        done = keys.generate(directory, force=args.force)
        _out(f"new signing key {done.kid}")
        _out(f"  private key  {done.private} (mode 0600): set GATEWAY_SIGNING_KEY_FILE={done.private}")
        _out(f"  public key   {done.public}")
        _out(f"  keyring      {done.keyring} (1 key): give it to receivers (--trust) and auditors")
        if done.archived is not None:
            _err(
                f"replaced key {done.previous}: private key archived in {done.archived} (0600); it is no longer in "
                f"{done.keyring}, so what it signed verifies only with that archive"
            )
        return EXIT_OK
    directory = Path(args.dir or args.out or ".")
    if args.action == "rotate":
        done = keys.rotate(directory)
        _out(f"new signing key {done.kid} (was {done.previous})")
        _out(f"  private key  {done.private} (mode 0600): restart `gateway serve` to sign with it")
        _out(f"  public key   {done.public}")
        _out(f"  keyring      {done.keyring}: {len(done.trusted)} keys, current first — redistribute it to receivers")
        _out(f"  previous private key moved to {done.archived} (0600): kept, not deleted")
        return EXIT_OK
    ring = keys.read_keyring(directory)
    _out(f"key directory {ring.directory}")
    _out(f"  current  {ring.current or '(none: run gateway keys generate)'}")
    for kid in ring.public:
        tags = [t for t, on in (("current", kid == ring.current), ("private key archived", kid in ring.archived)) if on]
        _out(f"  trusts   {kid}" + (f"  ({', '.join(tags)})" if tags else ""))
    for kid in ring.archived:
        if kid not in ring.public:
            _out(f"  archived {kid}  (not in the keyring: no longer trusted)")
    problems = 0
    if ring.current is not None and ring.current not in ring.public:
        _err(f"warning: the current key {ring.current} is not in {ring.keyring_path}: receivers cannot verify it")
        problems += 1
    for path in ring.loose_modes:
        _err(f"warning: {path} is readable by others than its owner: chmod 600 it")
        problems += 1
    return EXIT_OK if not problems else EXIT_REFUSED


# -- imports ---------------------------------------------------------------------------------------------
def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise IngestError(f"cannot read file: {exc.strerror}", where=Where(source=path)) from None


def _format(path: str, given: str | None, choices: tuple[str, ...]) -> str:
    if given:
        return given
    suffix = Path(path).suffix.lower()
    if suffix == ".csv" and "csv" in choices:
        return "csv"
    if suffix in (".ndjson", ".jsonl") and "ndjson" in choices:
        return "ndjson"
    return "bundle"


def _import(args: argparse.Namespace, what: str) -> int:
    """Read, check, plan, then (unless a dry run or anything refused) write all in one transaction."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway import imports
    from gateway.progress import bar
    from gateway.settings import Settings
    from gateway.store import DIRECTORY_TYPES, ResourceStore, make_engine

    settings = Settings.from_env()
    raw = _read(args.file)
    draft = imports.Plan(args.file)
    if what == "directory":
        fmt = _format(args.file, args.format, ("bundle", "csv"))
        if fmt == "csv":
            imports.read_csv(raw, args.file, draft)
        else:
            imports.read_bundle(raw, args.file, DIRECTORY_TYPES, draft)
    else:
        fmt = _format(args.file, args.format, ("bundle", "ndjson"))
        reader = imports.read_ndjson if fmt == "ndjson" else imports.read_bundle
        reader(raw, args.file, imports.CONSENT_TYPES, draft, keep_time=True)
    policy = _policy(settings) if what == "directory" else None
    now = datetime.now(UTC)
    engine = make_engine(args.db or settings.database_url)
    try:
        store = ResourceStore(engine=engine)
        with bar(f"checking {len(draft.items)} resources", len(draft.items)) as tick:
            imports.plan(store, draft, now=now, policy=policy, tick=tick)
        seqs = (0, 0)
        if not draft.refused and not args.dry_run and draft.writes:
            log = _audit_log(engine, settings)
            with bar(f"writing {len(draft.writes)} resources", len(draft.writes)) as tick:
                seqs = imports.apply(store, log, draft, who=operator(), now=now, tick=tick)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        _err(f"configuration error: database: {str(cause).strip().splitlines()[0]}")
        return EXIT_CONFIG
    finally:
        engine.dispose()
    _summary(draft, what, fmt, dry_run=args.dry_run, seqs=seqs)
    return EXIT_REFUSED if draft.refused else EXIT_OK


def _policy(settings: Any) -> Any:
    from gateway.mappings import load_mappings
    from gateway.policy import policy_from
    from gateway.translate.registry import SECTION_TRANSLATORS

    return policy_from(load_mappings(settings.mappings_overlay, translators=SECTION_TRANSLATORS))


def _audit_log(engine: Any, settings: Any) -> Any:
    """The audit log, signing a checkpoint when an import crosses a 1000-record boundary if the
    gateway's key is configured (as ``gateway serve`` would)."""
    from gateway.auditlog import AuditLog
    from gateway.seal import Signer, load_key

    key_file = getattr(settings, "signing_key_file", None)
    signer = Signer(load_key(_read(str(key_file)))) if key_file else None
    return AuditLog(engine, signer)


def _summary(draft: Any, what: str, fmt: str, *, dry_run: bool, seqs: tuple[int, int]) -> None:
    for refusal in draft.refused:
        _err(f"refused: {refusal}")
    for warning in draft.warnings[:MAX_WARNINGS]:
        _err(f"warning: {warning}")
    if len(draft.warnings) > MAX_WARNINGS:
        _err(f"warning: ... and {len(draft.warnings) - MAX_WARNINGS} more recipients like these")
    counts = draft.counts()
    columns = ("created", "updated", "unchanged", "refused")
    total = {c: sum(row[c] for row in counts.values()) for c in columns}
    verb = "would be " if dry_run or draft.refused else ""
    _out(f"{what} import of {draft.source} ({fmt}): {len(draft.items) + _unread(draft)} entries")
    width = max([len(t) for t in counts] + [5])
    for resource_type in sorted(counts):
        row = counts[resource_type]
        _out(f"  {resource_type:<{width}}  " + "  ".join(f"{c} {row[c]:>4}" for c in columns))
    _out(f"  {'total':<{width}}  " + "  ".join(f"{c} {total[c]:>4}" for c in columns))
    written = len(draft.writes)
    if draft.refused:
        _out(
            f"NOTHING WRITTEN: {len(draft.refused)} entr{'y' if len(draft.refused) == 1 else 'ies'} refused "
            f"(the import is all or nothing: fix them and import again; {written} {verb}written otherwise)"
        )
    elif dry_run:
        _out(f"dry run: nothing written; {written} resource version(s) {verb}written, {len(draft.unchanged)} unchanged")
    elif written:
        _out(
            f"{written} resource version(s) written in one transaction, each audited "
            f"(audit records {seqs[0]}..{seqs[1]}); {len(draft.unchanged)} unchanged"
        )
    else:
        _out(f"nothing to write: all {len(draft.unchanged)} already stored as given")


def _unread(draft: Any) -> int:
    """Refusals of entries that never became items (unreadable rows): they count as entries too."""
    refs = {i.where for i in draft.items}
    return sum(1 for r in draft.refused if r.where not in refs)


# -- wiring ----------------------------------------------------------------------------------------------
def _directory(args: argparse.Namespace) -> int:
    return _import(args, "directory")


def _consents(args: argparse.Namespace) -> int:
    return _import(args, "consents")


def add_parsers(sub: Any) -> None:
    """Register ``keys``, ``directory`` and ``consents`` on the ``gateway`` sub-command parser."""
    ky = sub.add_parser("keys", help="the gateway's signing keys: generate, rotate (keeping old ones verifiable), show")
    ky.add_argument(
        "action",
        choices=("generate", "rotate", "show"),
        help="generate: a new key (refuses to replace one without --force); rotate: a new current key, the old "
        "public key kept in keys.jwks and its private key archived; show: the keyring",
    )
    ky.add_argument("--out", metavar="DIR", help="key directory (generate; default: .)")
    ky.add_argument("--dir", metavar="DIR", help="key directory (rotate, show; default: .)")
    ky.add_argument("--force", action="store_true", help="generate: replace an existing key (archived, not trusted)")
    ky.set_defaults(handler=_keys)
    for name, helptext, formats in (
        ("directory", "the actor directory", ("bundle", "csv")),
        ("consents", "consents and legal representatives", ("bundle", "ndjson")),
    ):
        parser = sub.add_parser(name, help=f"import {helptext} (validated, all or nothing, idempotent, audited)")
        parser.add_argument("action", choices=("import",))
        parser.add_argument("file", metavar="FILE")
        parser.add_argument(
            "--format", choices=formats, help=f"{' or '.join(formats)} (default: from the file name's suffix)"
        )
        parser.add_argument("--dry-run", action="store_true", help="check and count, write nothing")
        parser.add_argument("--db", metavar="URL", help="database URL (default: GATEWAY_DATABASE_URL)")
        parser.set_defaults(handler=_directory if name == "directory" else _consents)
