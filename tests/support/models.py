"""Test models: the offline model with failure modes a test can switch on, and one that never stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from agents.items import TResponseStreamEvent

from backend.agent.offline import OfflineModel


class ScriptableOffline(OfflineModel):
    """The offline model, optionally stalling after N tokens, failing after N tokens, or pausing first."""

    def __init__(self, *, stall_after: int | None = None, fail_after: int | None = None, pause: float = 0) -> None:
        self.stall_after, self.fail_after, self.pause = stall_after, fail_after, pause

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[TResponseStreamEvent]:
        await asyncio.sleep(self.pause)
        tokens = 0
        async for event in super().stream_response(*args, **kwargs):
            yield event
            if event.type == "response.output_text.delta":
                tokens += 1
                if tokens == self.stall_after:
                    await asyncio.sleep(3600)
                if tokens == self.fail_after:
                    raise RuntimeError("provider blew up: SECRET-UPSTREAM-DETAIL")


class Flood(OfflineModel):
    """Streams 1 KB tokens for as long as anyone reads them (the model of a client that stops reading)."""

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[TResponseStreamEvent]:
        async for event in super().stream_response(*args, **kwargs):
            if event.type != "response.output_text.delta":
                yield event
                continue
            for n in range(1_000_000):
                await asyncio.sleep(0)
                yield event.model_copy(update={"delta": f"{n:05d}" + "x" * 1019})
