"""Errors become FHIR OperationOutcome here, and only here (the HTTP edge)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import (
    DATABASE_UNAVAILABLE,
    GatewayError,
    IngestError,
    MissingIdentity,
    ProfileViolation,
    SenderNotAllowed,
    UnsupportedDocument,
    database_failure,
)

# no OpenTelemetry in the gateway's apps: FastAPI looked for configured providers on every request (5% of
# the receiver's CPU under load), and this project configures none
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

__all__ = ["NO_TELEMETRY", "ApiError", "install", "outcome"]

FHIR_JSON = "application/fhir+json"
log = logging.getLogger("gateway.api")
STORAGE_RETRY_AFTER = 10  # seconds a caller is asked to wait when the database is away (503)


class ApiError(GatewayError):
    """An HTTP-level refusal (not found, not authenticated, forbidden...) with its status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def outcome(code: str, text: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def _response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _status(error: GatewayError) -> int:
    if isinstance(error, ApiError):
        return error.status
    if isinstance(error, SenderNotAllowed):
        return 403
    if isinstance(error, UnsupportedDocument):
        return 415 if "content type" in error.message else 422
    if isinstance(error, MissingIdentity | ProfileViolation):
        return 422
    if isinstance(error, IngestError):
        return 400
    return 500


OPERATION_OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "FHIR R4 OperationOutcome: every refusal",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"type": "string", "enum": ["fatal", "error", "warning", "information"]},
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                    "location": {"type": "array", "items": {"type": "string"}},
                    "expression": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}


def _declare_refusals(app: FastAPI) -> None:
    """The OpenAPI says what the handlers do: every 4xx (400 for a bad parameter, not FastAPI's 422
    ValidationError) and every 500 is a FHIR OperationOutcome."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        components["OperationOutcome"] = OPERATION_OUTCOME_SCHEMA
        from gateway.api.schemas import ANSWERS, REQUESTS, SCHEMAS  # the answers' shapes (imports the stores)

        components.update(SCHEMAS)
        ref = {"$ref": "#/components/schemas/OperationOutcome"}
        refusal = {"content": {FHIR_JSON: {"schema": ref}, "application/json": {"schema": ref}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                declared = ANSWERS.get((method, path))
                if declared is not None:  # the handler's real answers replace FastAPI's empty default
                    for status in [s for s in responses if s.startswith("2")]:
                        del responses[status]
                    responses.update(declared)
                if (method, path) in REQUESTS:
                    operation["requestBody"] = REQUESTS[(method, path)]
                responses["4XX"] = {"description": "Refused: a FHIR OperationOutcome", **refusal}
                responses["503"] = {
                    "description": "The database is not available: nothing was applied; send again after "
                    "`Retry-After` seconds (a FHIR OperationOutcome, code transient)",
                    **refusal,
                }
                responses["500"] = {
                    "description": "Internal error (never expected): a FHIR OperationOutcome",
                    **refusal,
                }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    _declare_refusals(app)

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, error: GatewayError) -> JSONResponse:
        if isinstance(error, ApiError):
            body = outcome(error.code, error.message)
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return _response(error.status, body, headers)
        return _response(_status(error), error.to_operation_outcome())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _response(400, outcome("invalid", f"{where}: {first.get('msg')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden"}.get(
            error.status_code, "processing"
        )
        return _response(error.status_code, outcome(code, str(error.detail)))

    async def _storage(_: Request, error: Exception) -> JSONResponse:
        """The database away (unreachable, disk full, locked too long): nothing was stored, and the caller
        should send again later — a 503 its interface engine retries, not a 500 that reads as our bug."""
        log.warning("database unavailable: %s", database_failure(error))  # no SQL, no parameters
        return _response(
            503,
            outcome("transient", "the database is not available: nothing was stored; send the request again later"),
            {"Retry-After": str(STORAGE_RETRY_AFTER)},
        )

    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, _storage)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")  # ids only: no request body is logged
        return _response(500, outcome("exception", "internal error; the request was not applied"))
