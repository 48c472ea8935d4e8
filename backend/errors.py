"""HTTP rendering of failures: FastAPI's `{"detail": ...}` plus a machine-readable `code` and the
request's `request_id` (its X-Request-ID), never a stack trace.

Services raise `ServiceError`s (backend/failures.py); this module maps each kind once to its status
and headers (`Retry-After` for limits and unavailable dependencies, `WWW-Authenticate` for 401).
Starlette's own HTTP errors (405, a 404 for an unknown path) get the same body. A last-resort middleware turns
anything unexpected into a JSON 500 with one log line, and keeps the connection usable.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend import failures
from backend.asgi import HttpMiddleware, WatchedSend
from backend.failures import ServiceError
from backend.request_context import current_request_id

log = logging.getLogger(__name__)

BEARER = {"WWW-Authenticate": "Bearer"}


class ErrorBody(BaseModel):
    """Every error answer: FastAPI's `detail` plus a machine-readable `code` (what this module emits)."""

    detail: str | list[dict[str, Any]] = Field(
        description="A message, or for 400/422 a list of `{loc, msg, type}` naming each bad value"
    )
    code: str = Field(description="Machine-readable kind of failure, e.g. `not_found`, `validation_error`")
    retryable: bool | None = Field(
        None, description="Whether the same request may succeed later (busy, limits, dependencies, turn failures)"
    )
    # A failed turn: its stored reply, so a client can retry it (same idempotency key) or show it.
    conversation_id: str | None = Field(None, description="A failed turn's conversation")
    message_id: str | None = Field(None, description="A failed turn's stored (error) reply")
    request_id: str | None = Field(
        None, description="The request's `X-Request-ID`: quote it when reporting a problem (it is on every log line)"
    )


def with_request_id(body: dict[str, Any]) -> dict[str, Any]:
    """An error body with the current request's id (set by RequestIdMiddleware)."""
    request_id = current_request_id()
    return {**body, "request_id": request_id} if request_id else body


# Each kind of failure, once: its HTTP status.
_STATUS: list[tuple[type[ServiceError], int]] = [
    (failures.Unauthorized, 401),
    (failures.NotFound, 404),
    (failures.ConversationBusy, 409),
    (failures.RetrySuperseded, 409),
    (failures.InvalidInput, 422),
    (failures.UnsupportedRequest, 400),
    (failures.LimitExceeded, 429),
    (failures.Unavailable, 503),
    (failures.TurnFailed, 502),
]


def status_of(error: ServiceError) -> int:
    if error.code == "model_timeout":
        return 504
    return next((status for kind, status in _STATUS if isinstance(error, kind)), 500)


def service_error_response(error: ServiceError) -> JSONResponse:
    detail: str | list[dict[str, Any]] = error.message
    if isinstance(error, failures.InvalidInput) and error.field is not None:
        detail = [{"loc": list(error.field), "msg": error.message, "type": error.code}]
    body: dict[str, Any] = {"detail": detail, "code": error.code}
    if error.retryable or isinstance(error, failures.TurnFailed):
        body["retryable"] = error.retryable
    if error.turn is not None:
        body["conversation_id"], body["message_id"] = str(error.turn[0]), str(error.turn[1])
    headers: dict[str, str] = {}
    if isinstance(error, failures.Unauthorized):
        headers.update(BEARER)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if isinstance(error, failures.LimitExceeded) and error.policy is not None:
        name, quota, window = error.policy
        headers["RateLimit-Policy"] = f'"{name}";q={quota};w={window}'
        headers["RateLimit"] = f'"{name}";r=0;t={headers["Retry-After"]}'
    return JSONResponse(with_request_id(body), status_code=status_of(error), headers=headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all with the `ErrorBody` shape."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


# What every authenticated route can answer besides its own errors (503: the identity provider's
# keys or the database; 500: the last resort, still an ErrorBody).
AUTH_ERRORS = (400, 401, 413, 422, 500, 503)

_DESCRIPTIONS = {
    400: "The body is not JSON (`bad_request`, `detail` says where), or a request this server does not offer",
    401: "Missing or invalid bearer token (with `WWW-Authenticate: Bearer`)",
    404: "No such conversation for this user",
    409: "A turn is already running on this conversation (or a retried message was already followed by newer ones)",
    413: "Request body too large",
    422: "Invalid input; `detail` lists the problems",
    429: "A per-user limit was reached (`Retry-After` says when to try again)",
    500: "An unexpected failure (`internal_error`), logged on the server; never a stack trace",
    502: "The model or its provider failed",
    503: "A dependency (the database, the MCP server, the identity provider's keys) is unavailable; `Retry-After`",
    504: "The model timed out",
}


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        body = with_request_id({"detail": exc.detail, "code": code})
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """400 `bad_request` for a body that is not JSON at all; 422 `validation_error` for JSON that
    does not fit. A client can fix the second by changing values, the first only by fixing its code."""
    # Drop the echoed input: it can be large and is the client's own data anyway.
    errors = [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in exc.errors()]
    if isinstance(exc.body, bytes):  # FastAPI left the body undecoded: it was not sent as JSON
        errors = [{"loc": ["body"], "msg": "The body must be JSON (Content-Type: application/json)", "type": NOT_JSON}]
    if any(err.get("type") == NOT_JSON for err in errors):
        return JSONResponse(with_request_id({"detail": errors, "code": "bad_request"}), status_code=400)
    return JSONResponse(with_request_id({"detail": errors, "code": "validation_error"}), status_code=422)


# The error type FastAPI and pydantic give an unparseable body.
NOT_JSON = "json_invalid"


class LastResortMiddleware(HttpMiddleware):
    """A JSON 500 for anything no handler took, logged once, without re-raising.

    Starlette's own 500 handler re-raises so the server logs a second traceback and drops the
    connection without `Connection: close`, which costs a keep-alive client its next request.
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        watched = WatchedSend(send)
        try:
            await self.app(scope, receive, watched)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not watched.started:
                body = with_request_id({"detail": "Internal server error", "code": "internal_error"})
                response = JSONResponse(body, status_code=500)
                await response(scope, receive, send)


class BodyLimitMiddleware(HttpMiddleware):
    """413 for request bodies over `max_bytes` (or a path's own limit in `per_path`), whether announced
    by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.per_path.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit)
            return
        seen = 0
        watched = WatchedSend(send)

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(413, f"Request body larger than {limit} bytes")
            return message

        try:
            await self.app(scope, counting_receive, watched)
        except _TooLarge:
            if not watched.started:
                await self._reject(send, limit)

    async def _reject(self, send: Send, limit: int) -> None:
        detail = f"Request body larger than {limit} bytes"
        response = JSONResponse(with_request_id({"detail": detail, "code": "payload_too_large"}), status_code=413)
        await response({"type": "http"}, _empty_receive, send)


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it instead of answering 400."""


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}
