"""Streaming plumbing shared by the SSE front doors (`/api/chat/stream` and `/chatkit`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar, cast

import anyio

T = TypeVar("T")

# Keep proxies (nginx, CDNs) from buffering or transforming the event stream.
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


async def with_heartbeats(events: Callable[[], AsyncIterator[T]], interval: float) -> AsyncIterator[T | None]:
    """Yield the stream's items, and None whenever `interval` passes without one.

    The stream runs in a task of its own (a turn's MCP connection must open and close in one task);
    when the client goes away this generator is closed, that task is cancelled, and a turn stores
    its partial answer as aborted before this returns.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()
    done = object()

    async def produce() -> None:
        try:
            async for event in events():
                await queue.put(event)
        finally:
            queue.put_nowait(done)

    task = asyncio.create_task(produce())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=interval)
            except TimeoutError:
                yield None
                continue
            if item is done:
                break
            yield cast(T, item)
        await task  # surfaces an unexpected crash of the producer
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError):
                await task
