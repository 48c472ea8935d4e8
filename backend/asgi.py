"""The two pieces every pure-ASGI middleware here needs, once.

The middlewares are pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which buffers and
breaks streamed responses. Each handles HTTP only and most need to know whether (and with what
status) the response has started: after that, the answer can no longer be changed.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HttpMiddleware:
    """Passes every scope but HTTP through untouched; subclasses implement `http`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class WatchedSend:
    """A `send` that remembers the response's status once it has started."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None

    @property
    def started(self) -> bool:
        return self.status is not None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)
