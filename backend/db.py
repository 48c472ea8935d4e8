"""The engine, and the one way async code touches the database.

psycopg2 blocks, so every unit of work runs in a worker thread as one short transaction
(`Database.run`), committed before it returns: a route that answers 2xx has committed. Nothing here
runs while the model thinks. Each unit is bounded in time on the event loop's side too, because a
stalled server (accepting, never answering) blocks a socket read that no server-side timeout can
end: after `DB_TIMEOUT_SECONDS` the request gets `503 database_unavailable` and the stuck thread is
left to finish on its own. Connection and operational errors become that same 503, logged as one line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from sqlalchemy import Connection, Engine, create_engine, exc, text
from sqlmodel import Session

from backend import metrics
from backend.config import Settings
from backend.failures import DatabaseUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
W = TypeVar("W", Connection, Session)

# Errors that say "the database cannot serve this now" rather than "this request is wrong".
_UNAVAILABLE = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)


def make_engine(settings: Settings) -> Engine:
    timeout_ms = int(settings.db_statement_timeout_seconds * 1000)
    engine = create_engine(
        settings.require_database_url(),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        # Waiting for a free connection is bounded too: an exhausted pool is a 503, not a hang.
        pool_timeout=settings.db_timeout_seconds,
        pool_recycle=1800,
        # No pre-ping round trip per checkout: a connection that died with its server fails its first
        # statement (503, retryable) and SQLAlchemy then replaces the whole pool.
        pool_pre_ping=False,
        # Bound parameters (user ids, task titles, message text) stay out of error messages and logs.
        hide_parameters=True,
        connect_args={
            # A server that silently drops connections (Neon scales to zero) must not hang a request.
            "connect_timeout": max(1, int(settings.db_timeout_seconds)),
            "options": f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        },
    )
    metrics.track_pool(engine)
    return engine


def is_unavailable(error: BaseException) -> bool:
    return isinstance(error, _UNAVAILABLE) or (isinstance(error, exc.DBAPIError) and error.connection_invalidated)


class Database:
    """Runs units of work off the event loop, each in a transaction of its own, within a time bound."""

    def __init__(self, engine: Engine, timeout: float, connections: int | None = None) -> None:
        self.engine = engine
        self.timeout = timeout
        # At most as many units in worker threads as the pool has connections: under load the rest
        # wait here instead of piling into threads that contend for the GIL and the pool (which made
        # a slow event loop look like a stalled database: 503s). While the database is not answering
        # (a unit ran out of time and none has been answered since) the queued units give up at once,
        # so a stalled database still answers every request within the unit's bound.
        self._slots = asyncio.Semaphore(connections) if connections else None
        self._stalled = False
        self._waiting: set[asyncio.Timeout] = set()

    async def run(self, work: Callable[[Connection], T], *, within: float | None = None) -> T:
        """`work(connection)` in one transaction, committed before this returns.

        Raises `DatabaseUnavailable` when the database cannot be reached, fails operationally, or
        does not answer within the bound; any other error of `work` propagates unchanged.
        """
        return await self._bounded(self._transaction, work, within)

    async def run_orm(self, work: Callable[[Session], T], *, within: float | None = None) -> T:
        """`run` for ORM code (the MCP server's tools): `work(session)` in one committed transaction."""
        return await self._bounded(self._orm_transaction, work, within)

    async def _bounded(self, unit: Callable[[Callable[[W], T]], T], work: Callable[[W], T], within: float | None) -> T:
        try:
            if self._slots is None:
                return await self._run(unit, work, within)
            await self._acquire_slot()
            try:
                result = await self._run(unit, work, within)
            except TimeoutError:
                self._stall()
                raise
            finally:
                self._slots.release()
            self._stalled = False
            return result
        except TimeoutError:
            log.warning("database did not answer within %.1f s", within or self.timeout)
            raise DatabaseUnavailable() from None
        except exc.DBAPIError as error:
            if not is_unavailable(error):
                raise
            log.warning("database unavailable: %s", type(error.orig or error).__name__)
            raise DatabaseUnavailable() from None
        except exc.TimeoutError:
            log.warning("database pool exhausted: no free connection in time")
            raise DatabaseUnavailable() from None

    async def _acquire_slot(self) -> None:
        """Wait for a slot as long as the units ahead are answered, however slowly (a busy process is
        slow, not failing); while the database is not answering them, give up at once instead."""
        assert self._slots is not None
        if self._stalled and self._slots.locked():
            raise TimeoutError
        async with asyncio.timeout(None) as waiting:
            self._waiting.add(waiting)
            try:
                await self._slots.acquire()
            finally:
                self._waiting.discard(waiting)

    def _stall(self) -> None:
        """A unit ran out of time: until one is answered again, the queued ones give up now."""
        self._stalled = True
        now = asyncio.get_running_loop().time()
        for waiting in self._waiting:
            waiting.reschedule(now)

    async def _run(self, unit: Callable[[Callable[[W], T]], T], work: Callable[[W], T], within: float | None) -> T:
        async with asyncio.timeout(within or self.timeout):
            return await anyio.to_thread.run_sync(unit, work, abandon_on_cancel=True)

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        with self.engine.begin() as connection:
            return work(connection)

    def _orm_transaction(self, work: Callable[[Session], T]) -> T:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            return work(session)

    async def ping(self, within: float) -> bool:
        try:
            await self.run(lambda connection: connection.execute(text("SELECT 1")), within=within)
        except DatabaseUnavailable:
            return False
        return True
