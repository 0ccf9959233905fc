"""Request bodies over the size limit are refused before they are read.

``Request.body()`` reads a whole body into memory before a handler can look at its size, so a client
could make the gateway buffer any amount.  This ASGI middleware wraps ``receive``: a body whose
``Content-Length`` is over ``max_bytes`` (or not a number) is refused at the first read, without
reading any of it; a chunked body (no ``Content-Length``) is refused as soon as what arrived passes the
limit.  The refusal is an :class:`~gateway.api.outcomes.ApiError` (413 ``too-long``) raised inside the
handler, so the handler's own refusal path (the audit of a refused letter) and the OperationOutcome
answer are the usual ones.
"""

from __future__ import annotations

from typing import Any

from gateway.api.outcomes import ApiError

__all__ = ["BodyLimit"]

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        limit = self.max_bytes
        shown = declared.decode("latin-1") if declared is not None else ""
        over = declared is not None and (not declared.strip().isdigit() or int(declared) > limit)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if over:
                raise ApiError(
                    413,
                    "too-long",
                    f"request body of {shown!r} bytes is over the {limit}-byte limit",
                )
            message: Message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, "too-long", f"request body over the {limit}-byte limit")
            return message

        await self.app(scope, limited, send)
