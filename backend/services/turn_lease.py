"""The "turn running" lease while a turn runs: renew it, fence the run when it is lost.

`begin_turn` takes the lease (a `turn_id` and an expiry by the database's clock) and `finish_turn`
releases it. In between, `TurnLease` renews it every third of its period. If the lease was taken
over (this replica stalled past its expiry and another took the conversation), or could not be
renewed before it ran out, the run is cancelled: its reply must not be stored over the new owner's
turn, and `finish_turn` would refuse it anyway (it compares `turn_id`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType

import anyio

from backend.db import Database
from backend.failures import ConversationBusy, DatabaseUnavailable, ServiceError
from backend.services.turn_store import BegunTurn, renew_lease

log = logging.getLogger(__name__)


class TurnLease:
    """`async with TurnLease(...) as lease:` around a run; afterwards `lease.lost` says if it was fenced.

    The body runs in a cancel scope that the renewer cancels when the lease is lost; the scope
    swallows that cancellation, so the code after the block decides what to answer (`lost`).
    """

    def __init__(self, db: Database, turn: BegunTurn, lease_seconds: float) -> None:
        self._db = db
        self._turn = turn
        self._seconds = lease_seconds
        self._scope = anyio.CancelScope()
        self._renewer: asyncio.Task[None] | None = None
        self.lost: ServiceError | None = None

    async def __aenter__(self) -> TurnLease:
        self._scope.__enter__()
        self._renewer = asyncio.create_task(self._renew())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        if self._renewer is not None:
            self._renewer.cancel()
        return bool(self._scope.__exit__(kind, error, trace))

    async def _renew(self) -> None:
        held_until = time.monotonic() + self._seconds
        while True:
            await asyncio.sleep(self._seconds / 3)
            try:
                held = await self._db.run(lambda c: renew_lease(c, self._turn, self._seconds), within=self._seconds / 3)
            except DatabaseUnavailable:
                if time.monotonic() < held_until:
                    continue  # try again while the lease still holds
                self._fence(DatabaseUnavailable(), "could not be renewed before it ran out")
                return
            if not held:
                self._fence(ConversationBusy(), "was taken over by another turn")
                return
            held_until = time.monotonic() + self._seconds

    def _fence(self, answer: ServiceError, why: str) -> None:
        log.warning("turn lease of conversation %s %s: cancelling the run", self._turn.conversation_id, why)
        self.lost = answer
        self._scope.cancel()
