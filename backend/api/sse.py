"""Server-Sent Events responses: what every streaming front door shares.

`EventStream` sends chunks as they come, ends a stream whose client stops reading (no send
completes within `SSE_SEND_TIMEOUT_SECONDS`), and always runs its `on_close` when the response
ends, however it ends: before the first byte (the client hung up while the turn was being begun),
mid-stream, or normally. That is what frees a turn's lease at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backend.metrics import SSE_STREAMS_OPEN

log = logging.getLogger(__name__)

# Keep proxies (nginx, CDNs) from buffering or transforming the event stream.
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def frame(data: str) -> bytes:
    """One data-only SSE event (no `event:` name: EventSource.onmessage sees only unnamed events)."""
    return f"data: {data}\n\n".encode()


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        status_code: int = 200,
        *,
        send_timeout: float,
        on_close: Callable[[], Awaitable[None]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(chunks, status_code, headers={**SSE_HEADERS, **(headers or {})}, media_type=self.media_type)
        self._send_timeout = send_timeout
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                # A client that does not read fills the socket buffers; then send waits. Give up on it.
                async with asyncio.timeout(self._send_timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TimeoutError:
            log.info("stream ended: the client read nothing for %.0f s", self._send_timeout)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        SSE_STREAMS_OPEN.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            SSE_STREAMS_OPEN.dec()
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        # A disconnect interrupts iteration without closing the generator: close it (its producers
        # stop and store what they have), then whatever was begun for this response.
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            await close()
        if self._on_close is not None:
            await self._on_close()
