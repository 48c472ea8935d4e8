"""The request id: one value that follows a request through both processes and every log line.

`RequestIdMiddleware` (pure ASGI, so streaming responses stream) takes the client's `X-Request-ID`
when it is sane (at most 128 characters of `[A-Za-z0-9._:-]`: safe to echo into headers and log
lines) or makes one, keeps it in `REQUEST_ID` for the request's code (the logging filter, error
bodies, the MCP client that forwards it), and sets it on the response. Both the API and the MCP
server run it, so the id the API forwards is the one the MCP server logs.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.types import Message, Receive, Scope, Send

from backend.asgi import HttpMiddleware

HEADER = "X-Request-ID"
_HEADER_KEY = b"x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def sane(value: str | None) -> bool:
    return value is not None and _SANE.fullmatch(value) is not None


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's id from raw ASGI headers when sane, else a new one."""
    for name, value in headers:
        if name.lower() == _HEADER_KEY:
            candidate = value.decode("latin-1")
            return candidate if sane(candidate) else new_request_id()
    return new_request_id()


class RequestIdMiddleware(HttpMiddleware):
    """Every HTTP response gets `X-Request-ID`; the request's code sees it in `REQUEST_ID`."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = request_id_from(scope["headers"])
        raw = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER_KEY]
                message = {**message, "headers": [*headers, (_HEADER_KEY, raw)]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
