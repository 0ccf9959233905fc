"""The gateway's one error tree.

Every error the gateway raises on purpose is a :class:`GatewayError`. Each class carries the FHIR
``OperationOutcome.issue.code`` it maps to (``issue_code``) and whether a retry may help
(``retryable``); the HTTP edge and the CLI turn any of them into an OperationOutcome or one line of
text without knowing the subclass.  Foreign exceptions (lxml, pydantic, yaml) are translated at the
module that calls the foreign library, never further out.

::

    GatewayError                       issue_code     retryable
    ├── IngestError                    structure      no    malformed or unreadable input
    │   ├── UnsafeInput                security       no    DTD, entity declaration, external reference
    │   ├── TooLarge                   too-long       no    over the configured size limit
    │   ├── EncodingError              structure      no    bytes that do not match the declared encoding
    │   ├── UnsupportedDocument        not-supported  no    a document type no adapter handles
    │   ├── MissingIdentity            required       no    a letter without patient identity
    │   └── PriorMismatch              business-rule  no    a prior list that is not the same patient's
    ├── SenderNotAllowed               forbidden      no    a client sending for an establishment it is not bound to
    ├── MappingError
    │   ├── MappingLoadError           exception      no    start-up: bad file, unknown translator, duplicates
    │   └── UnmappedCode               code-invalid   no    only when the table says on_unmapped: error
    └── ProfileViolation               invariant      no    an output resource fails validation

Outside the tree, :data:`DATABASE_UNAVAILABLE` names SQLAlchemy's errors for a database that is away
(unreachable, disk full, locked too long, no pooled connection in time): nothing was written and the
same request later may succeed, so the edges answer "send again" (HTTP 503, MLLP AR) instead of an
internal error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

__all__ = [
    "DATABASE_UNAVAILABLE",
    "EncodingError",
    "GatewayError",
    "IngestError",
    "MappingError",
    "MappingLoadError",
    "MissingIdentity",
    "PriorMismatch",
    "ProfileViolation",
    "SenderNotAllowed",
    "TooLarge",
    "UnmappedCode",
    "UnsafeInput",
    "UnsupportedDocument",
    "database_failure",
]

DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeout)


def database_failure(error: BaseException) -> str:
    """What a log may say of a database error: the driver's error class and the first line of its message
    (``OperationalError: database or disk is full``), never the SQL or its parameters."""
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:200]}" if lines else type(cause).__name__


@dataclass(frozen=True, slots=True)
class Where:
    """Where in the input the problem is: a file or source name, and a line/column or path."""

    source: str = ""
    line: int | None = None
    column: int | None = None
    path: str = ""

    def __str__(self) -> str:
        parts = [self.source] if self.source else []
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        text = ":".join(parts)
        if self.path:
            text = f"{text} {self.path}".strip()
        return text


class GatewayError(Exception):
    """Root of every deliberate gateway error."""

    issue_code: ClassVar[str] = "exception"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, where: Where | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where or Where()

    def one_line(self) -> str:
        """What went wrong and where, on one line (the CLI prints this)."""
        where = str(self.where)
        text = " ".join(self.message.split())
        return f"{where}: {text} [{self.issue_code}]" if where else f"{text} [{self.issue_code}]"

    def to_operation_outcome(self) -> dict[str, Any]:
        """The FHIR R4 OperationOutcome that reports this error."""
        issue: dict[str, Any] = {
            "severity": "error",
            "code": self.issue_code,
            "diagnostics": " ".join(self.message.split()),
        }
        location = str(self.where)
        if location:
            issue["location"] = [location]
        if self.where.path:
            issue["expression"] = [self.where.path]
        return {"resourceType": "OperationOutcome", "issue": [issue]}


class IngestError(GatewayError):
    issue_code = "structure"


class UnsafeInput(IngestError):
    issue_code = "security"


class TooLarge(IngestError):
    issue_code = "too-long"


class EncodingError(IngestError):
    issue_code = "structure"


class UnsupportedDocument(IngestError):
    issue_code = "not-supported"


class MissingIdentity(IngestError):
    issue_code = "required"


class PriorMismatch(IngestError):
    issue_code = "business-rule"


class SenderNotAllowed(GatewayError):
    """The letter's establishment is not one its sender is bound to (``GATEWAY_SENDER_ORGANIZATIONS``):
    the client authenticated, but may not speak for that custodian.  Resending it unchanged cannot help."""

    issue_code = "forbidden"


class MappingError(GatewayError):
    issue_code = "exception"


class MappingLoadError(MappingError):
    issue_code = "exception"


class UnmappedCode(MappingError):
    issue_code = "code-invalid"


class ProfileViolation(GatewayError):
    issue_code = "invariant"
