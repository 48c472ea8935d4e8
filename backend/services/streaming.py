"""A producer task feeding a bounded queue, read with heartbeats: the shape of every streamed answer.

The producer (a turn, or the whole ChatKit pipeline) runs in a task of its own, so it can be
cancelled as a unit when the client goes away, and it waits when the queue is full, so a client
that stops reading holds the run back instead of growing a buffer. The reader gets None whenever
`heartbeat` seconds pass without an item.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar, cast

T = TypeVar("T")

END = object()
BUFFER = 256


async def drain(
    queue: asyncio.Queue[object], producer: asyncio.Task[None], heartbeat: float
) -> AsyncIterator[T | None]:
    """Items from `queue` until `END`, and None when a heartbeat is due; then surfaces the producer's
    exception, if it crashed instead of ending with `END`."""
    while True:
        try:
            async with asyncio.timeout(heartbeat):
                item = await queue.get()
        except TimeoutError:
            if producer.done() and queue.empty():
                break
            yield None
            continue
        if item is END:
            break
        yield cast(T, item)
    if not producer.cancelled():  # cancelled means closed by its owner: nothing to surface
        await producer


async def stop(producer: asyncio.Task[None]) -> None:
    """Cancel a producer and wait until it has cleaned up (a turn stores its partial answer)."""
    if not producer.done():
        producer.cancel()
    await asyncio.gather(producer, return_exceptions=True)


async def with_heartbeats(source: AsyncIterable[T], heartbeat: float) -> AsyncIterator[T | None]:
    """`source`'s items, read in a task of its own, with None whenever a heartbeat is due."""
    queue: asyncio.Queue[object] = asyncio.Queue(BUFFER)

    async def produce() -> None:
        async for item in source:
            await queue.put(item)
        await queue.put(END)

    producer = asyncio.create_task(produce())
    try:
        async for item in drain(queue, producer, heartbeat):
            yield cast(T | None, item)
    finally:
        await stop(producer)
