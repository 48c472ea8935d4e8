"""uvicorn's httptools protocol with the limits it lacks: header size, header count, header read time.

httptools buffers a header until it ends, however long, and uvicorn never times out a client that is
still sending its request line and headers (slowloris). This subclass counts the bytes of each
request's head as they arrive and refuses it with `431 headers_too_large` once over
`MAX_HEADER_BYTES` or `MAX_HEADER_COUNT`, before the app runs, and closes a connection whose head
is not complete within `HEADER_TIMEOUT_SECONDS` (`408`). A few attribute updates per read and one
timer per request: it keeps httptools' speed (`bench/header_limits.py` measures it).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from backend.request_context import new_request_id, request_id_from


@dataclass(frozen=True)
class HeaderLimits:
    max_bytes: int = 16_384
    max_count: int = 100
    timeout_seconds: float = 10.0


Problem = tuple[int, str, str]  # status, code, detail


def _json_error(problem: Problem, request_id: str) -> bytes:
    _, code, detail = problem
    body = {"detail": detail, "code": code, "request_id": request_id}
    return json.dumps(body, separators=(",", ":")).encode()


class _Refusal:
    """A tiny ASGI app that answers one error and closes the connection (runs instead of the real app).

    The app's RequestIdMiddleware never runs for it, so it takes or makes the request id itself."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        http_scope: Any = scope  # always an HTTP scope here
        request_id = request_id_from(list(http_scope["headers"]))
        body = _json_error(self.problem, request_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": self.problem[0], "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` plus `HeaderLimits` (read from the config's `header_limits`)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits: HeaderLimits = getattr(config, "header_limits", None) or HeaderLimits()
        self.limits = limits
        # A request's head runs from its first byte (or the connection's start) to the end of its headers.
        self.in_head = True
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a whole head is closed too (uvicorn alone would keep it forever).
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            if self.head_timer is None:  # the next request on a kept-alive connection begins
                self._arm_head_timer()
            self.head_bytes += len(data)
        super().data_received(data)
        # Still inside the head after this read: httptools holds all of it, so stop here.
        if self.in_head and self.head_bytes > self.limits.max_bytes and not self.transport.is_closing():
            self._refuse_head(self._too_large())

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._cancel_head_timer()
        problem = self._head_problem()
        if problem is None:
            super().on_headers_complete()
            return
        # Answer through the normal request cycle, with a refusal in place of the app.
        app, self.app = self.app, _Refusal(problem)
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        if self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0  # what follows is the next request's head

    def _head_problem(self) -> Problem | None:
        if len(self.headers) > self.limits.max_count:
            return 431, "headers_too_large", f"Too many request headers (at most {self.limits.max_count})"
        size = len(self.url) + sum(len(name) + len(value) for name, value in self.headers)
        return self._too_large() if size > self.limits.max_bytes else None

    def _too_large(self) -> Problem:
        return 431, "headers_too_large", f"Request headers too large (at most {self.limits.max_bytes} bytes)"

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.limits.timeout_seconds, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if not self.in_head or self.transport.is_closing():
            return
        if self.head_bytes:
            self._refuse_head((408, "request_timeout", "Request headers not received in time"))
        else:  # nothing sent: an idle or abandoned connection, not a request to answer
            self.transport.close()

    def _refuse_head(self, problem: Problem) -> None:
        """Answer a request whose head never completed (no request cycle exists for it) and close.

        Its headers were never parsed, so its request id is a new one."""
        self.in_head = False
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an earlier response is still being written: no room for ours
            return
        request_id = new_request_id()
        body = _json_error(problem, request_id)
        head = [STATUS_LINE[problem[0]]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"x-request-id: " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()
