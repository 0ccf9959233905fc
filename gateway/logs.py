"""Logging: one JSON object per line on stderr, with letter / message ids and never patient data.

Every record — from :func:`get_logger` (structlog) and from the standard ``logging`` module (uvicorn,
libraries) — goes through one ``logging`` handler whose formatter (structlog's ``ProcessorFormatter``)
renders it as JSON (``timestamp`` in ISO 8601 UTC, ``level``, ``logger``, ``event``, and the ids bound
with :func:`bind` or passed as keywords: ``letter_id``, ``message_id``, ``recipient`` (directory id),
``attempt``, ``outcome``...), or as a readable line for development (``console``).

Why so careful: logs leave the gateway (collectors, tickets, screenshots) with none of the audit's
access control, so they carry ids that point into the audit, never what the audit protects:

- exceptions are logged with their type, an error class where the library has one and the frames
  (file, line, function) — never their message: lxml, SQLAlchemy and httpx quote documents, bound
  parameters and URLs in theirs;
- uvicorn's access log (whose line holds the query string, e.g. ``/Consent?patient=...|<INS>``) is
  replaced by :mod:`gateway.api.ops`' own request line, and if it is switched on anyway a filter drops
  the query string;
- :func:`redact` runs last on every record: values under patient-ish keys and digit runs shaped like
  an INS / NIR (13-15 digits, spaced or not) are replaced, whatever the code above it did.
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, unbind_contextvars
from structlog.types import EventDict, Processor

__all__ = [
    "FORMATS",
    "LogFormat",
    "bind",
    "bound",
    "configure",
    "exception_fields",
    "get_logger",
    "redact",
    "reset",
    "unbind",
]

LogFormat = Literal["json", "console"]
FORMATS: tuple[LogFormat, ...] = ("json", "console")
REDACTED = "[redacted]"

bind = bind_contextvars  # ids for every line logged from here on in this context (a request, a delivery)
bound = bound_contextvars  # the same, for a ``with`` block
unbind = unbind_contextvars

# an INS / NIR: 13 digits (+ a 2-digit key), possibly spaced; not inside a longer word or hash (nor an OID)
_INS_LIKE = re.compile(r"(?<![0-9A-Za-z.])[0-9](?: ?[0-9]){12,14}(?![0-9A-Za-z])")
_DIGIT = re.compile("[0-9]")
# keys whose values are patient data by name (exact words of a snake_case / camelCase key)
_PATIENT_KEYS = frozenset(
    {
        "patient",
        "name",
        "names",
        "family",
        "given",
        "birth",
        "birthdate",
        "dob",
        "ins",
        "nir",
        "ssn",
        "address",
        "telecom",
        "phone",
        "email",
        "query",
        "querystring",
        "body",
        "content",
        "document",
        "narrative",
    }
)
_WORDS = re.compile(r"[a-z]+")
_KEY_CACHE: dict[str, bool] = {}
# bookkeeping keys of structlog and of the record that are never patient data
_SAFE_KEYS = frozenset({"event", "timestamp", "level", "logger", "_record", "_from_structlog"})


def _patient_key(key: str) -> bool:
    known = _KEY_CACHE.get(key)
    if known is None:
        spaced = re.sub(r"([a-z])([A-Z])", r"\1_\2", key).lower()
        known = key not in _SAFE_KEYS and bool(_PATIENT_KEYS.intersection(_WORDS.findall(spaced)))
        if len(_KEY_CACHE) < 4096:
            _KEY_CACHE[key] = known
    return known


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        # only a string with 13 characters and an ASCII digit can hold a match: most values are skipped at C speed
        return _INS_LIKE.sub(REDACTED, value) if len(value) >= 13 and _DIGIT.search(value) else value
    if isinstance(value, int) and not isinstance(value, bool) and 10**12 <= abs(value) < 10**15:
        return REDACTED
    if isinstance(value, Mapping):
        return {k: REDACTED if _patient_key(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """The last line of defence, run on every record just before rendering: values under patient-ish
    keys (``patient``, ``*_name``, ``birth_date``, ``ins``, ``query``...) and INS / NIR-shaped digit runs
    anywhere (the message included) are replaced by ``[redacted]``."""
    for key, value in list(event_dict.items()):
        if key in ("_record", "_from_structlog"):
            continue
        event_dict[key] = REDACTED if _patient_key(key) else _scrub(value)
    return event_dict


def _error_class(exc: BaseException) -> str | None:
    """A machine-readable class of the error where the library has one (never its text)."""
    issue = getattr(exc, "issue_code", None) or getattr(exc, "code", None)
    if isinstance(issue, str) and issue.replace("-", "").replace("_", "").isalnum() and len(issue) <= 40:
        return issue
    log = getattr(exc, "error_log", None)  # lxml: the libxml2 error type, e.g. ERR_TAG_NAME_MISMATCH
    last = getattr(log, "last_error", None) if log is not None else None
    if last is not None and getattr(last, "type_name", None):
        return str(last.type_name)
    orig = getattr(exc, "orig", None)  # SQLAlchemy: the driver's exception type (and SQLSTATE)
    if isinstance(orig, BaseException):
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        return f"{_qualname(type(orig))}{f' {state}' if state else ''}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return None


def _qualname(kind: type[BaseException]) -> str:
    module = kind.__module__
    return kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"


def exception_fields(exc: BaseException, frames: int = 12) -> dict[str, Any]:
    """What a log may say about an exception: its type, error class and where it was raised (the last
    ``frames`` frames, file:line function), and the same for its causes — no message, no source line."""
    chain: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < 5:
        seen.add(id(current))
        entry: dict[str, Any] = {"type": _qualname(type(current))}
        error_class = _error_class(current)
        if error_class:
            entry["error_class"] = error_class
        stack = traceback.extract_tb(current.__traceback__)[-frames:]
        entry["frames"] = [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in stack]
        chain.append(entry)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    head = chain[0]
    fields: dict[str, Any] = {"exc_type": head["type"], "exc_frames": head["frames"]}
    if "error_class" in head:
        fields["exc_class"] = head["error_class"]
    if len(chain) > 1:
        fields["exc_causes"] = chain[1:]
    return fields


def _short(filename: str) -> str:
    """A frame's file relative to the package or site-packages (no home directories in logs)."""
    for marker in ("/site-packages/", "/gateway/", "/tests/"):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at + 1 :] if marker != "/site-packages/" else filename[at + len(marker) :]
    return filename.rsplit("/", 1)[-1]


def safe_exceptions(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Replace ``exc_info`` (``log.exception``, ``exc_info=True``) by :func:`exception_fields`."""
    info = event_dict.pop("exc_info", None)
    exc = event_dict.pop("exception", None) if isinstance(event_dict.get("exception"), BaseException) else None
    if info is True:
        info = sys.exc_info()
    if isinstance(info, BaseException):
        exc = info
    elif isinstance(info, tuple) and len(info) == 3 and isinstance(info[1], BaseException):
        exc = info[1]
    if exc is not None:
        event_dict.update(exception_fields(exc))
    event_dict.pop("stack_info", None)  # a stack is code, but its rendering may quote locals' reprs
    return event_dict


_FIRST = ("timestamp", "level", "logger", "event")


def _ordered(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """``timestamp level logger event`` first, then the ids and the rest: lines read the same way."""
    head = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    head.update(event_dict)
    return head


class _OnlyUpgrades(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or str(record.msg).startswith("Running ")


class _DropQuery(logging.Filter):
    """uvicorn's access line without the query string (``GET /Consent?patient=...`` → ``GET /Consent``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def _json_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _pre_chain() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        safe_exceptions,
    ]


def _route_to_stdlib() -> None:
    """structlog loggers hand their (already structured) records to ``logging``; whichever handler
    is installed renders them (:func:`configure`'s, or a test's ``caplog``)."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_pre_chain(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # configure() may run again (tests): no logger keeps an old chain
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named like a ``logging`` one (``gateway.deliver``...)."""
    if not structlog.is_configured():
        _route_to_stdlib()
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


class _GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure` installs (and replaces when called again)."""


def configure(
    fmt: LogFormat = "json",
    level: str | int = "INFO",
    stream: TextIO | None = None,
    *,
    access_log: bool = True,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as JSON lines or, with ``console``, readable lines.

    Called once by ``gateway serve`` / ``gateway receiver``; calling it again replaces its handler
    (and leaves other handlers alone, e.g. pytest's).  ``access_log=False`` silences the per-request line.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    _route_to_stdlib()
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_json_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=bool(getattr(stream or sys.stderr, "isatty", lambda: False)()))
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact, _ordered, renderer],
    )
    handler = _GatewayHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GatewayHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()  # uvicorn's own dictConfig handlers would print a second, plain line
        uvicorn_logger.propagate = True
    _filter_once(logging.getLogger("uvicorn.access"), _DropQuery())
    logging.getLogger("gateway.access").setLevel(logging.INFO if access_log else logging.WARNING)
    for name in ("httpx", "httpx2", "httpcore"):  # a line per outgoing request, with its full URL: not wanted
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # alembic says "Context impl SQLiteImpl." each time a schema is checked and lists its plugins; the
    # migrations it runs ("Running upgrade 0001 -> 0002") are kept
    logging.getLogger("alembic.runtime.plugins").setLevel(max(logging.WARNING, root.level))
    _filter_once(logging.getLogger("alembic.runtime.migration"), _OnlyUpgrades())
    return handler


def _filter_once(logger: logging.Logger, added: logging.Filter) -> None:
    if not any(type(f) is type(added) for f in logger.filters):
        logger.addFilter(added)


def reset(handler: logging.Handler | None = None) -> None:
    """Undo :func:`configure` (tests): remove its handler; structlog keeps routing to ``logging``."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GatewayHandler) or h is handler]:
        root.removeHandler(old)
