"""The database goes away or hangs: every request still gets an answer, soon, and service comes back.

A PostgreSQL server of these tests' own (never the shared one) is stopped, started and stalled
(SIGSTOP: it accepts connections and never answers) under a real API and MCP server on loopback,
with one keep-alive client, as a browser or proxy would hold it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import Engine, text

from backend.cli import migrate
from backend.config import Settings
from backend.db import Database
from backend.main import create_app
from tests.conftest import make_settings
from tests.support.private_pg import PrivateServer
from tests.support.servers import serve_in_thread
from tests.support.stack import mcp_server, with_free_mcp_port
from tests.support.tokens import auth

ALICE = auth("alice")


@pytest.fixture(scope="module")
def private_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    server = PrivateServer(tmp_path_factory.mktemp("pg"))
    yield server
    server.resume()
    server.stop()


@pytest.fixture
def faulty(private_pg: PrivateServer) -> Iterator[tuple[PrivateServer, Settings, str]]:
    """The API and the MCP server on the private server, and the API's base URL."""
    settings = make_settings(private_pg.database(f"faults_{uuid.uuid4().hex[:8]}"), db_timeout_seconds=2.0)
    migrate(settings)
    settings = with_free_mcp_port(settings)
    with mcp_server(settings), serve_in_thread(create_app(settings)) as base:
        yield private_pg, settings, base
    private_pg.resume()
    private_pg.start()


def _until(check: object, seconds: float) -> float:
    """Seconds until `check()` held (it must, within `seconds`)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s")


def _unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert (body["code"], body["retryable"]) == ("database_unavailable", True)
    assert int(response.headers["retry-after"]) >= 1
    assert "Traceback" not in response.text and "psycopg2" not in response.text


def test_a_stopped_database_is_503_on_every_request_and_service_comes_back(
    faulty: tuple[PrivateServer, Settings, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, _, base = faulty
    with httpx.Client(base_url=base, headers=ALICE, timeout=30) as http:
        acknowledged = http.post("/api/chat", json={"message": "add buy milk"})
        assert acknowledged.status_code == 200
        server.stop()
        caplog.clear()
        # The same keep-alive connection gets an answer to every request, one after the other.
        for _ in range(3):
            _unavailable(http.get("/api/conversations"))
            _unavailable(http.post("/api/chat", json={"message": "hello"}))
            _unavailable(http.get(f"/api/conversations/{acknowledged.json()['conversation_id']}"))
        ready = http.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
        # One warning line per failure, no tracebacks.
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert errors == []
        assert any("database unavailable" in r.getMessage() for r in caplog.records)

        server.start()
        _until(lambda: http.get("/api/conversations").status_code == 200, 15)
        listed = http.get("/api/conversations").json()["data"]
        assert [c["id"] for c in listed] == [acknowledged.json()["conversation_id"]]  # nothing acknowledged lost
        assert http.post("/api/chat", json={"message": "show my tasks"}).status_code == 200


def test_a_stalled_database_is_503_within_the_bound_and_service_comes_back(
    faulty: tuple[PrivateServer, Settings, str],
) -> None:
    server, settings, base = faulty
    with httpx.Client(base_url=base, headers=ALICE, timeout=60) as http:
        assert http.post("/api/chat", json={"message": "hello"}).status_code == 200
        server.stall()
        try:
            started = time.monotonic()
            _unavailable(http.get("/api/conversations"))
            waited = time.monotonic() - started
            assert waited < settings.db_timeout_seconds + 5  # bounded by DB_TIMEOUT_SECONDS, not the stall
            _unavailable(http.post("/api/chat", json={"message": "hello again"}))
            started = time.monotonic()
            ready = http.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
            assert time.monotonic() - started < 5
        finally:
            server.resume()
        _until(lambda: http.get("/api/conversations").status_code == 200, 20)
        assert http.post("/api/chat", json={"message": "still here?"}).status_code == 200


def test_requests_queued_behind_a_stalled_database_are_503_within_the_bound(
    private_pg: PrivateServer,
) -> None:
    """One connection slot, six requests at once: once the running one runs out of time, those waiting
    for the slot give up too, instead of each waiting its turn behind the stalled ones."""
    settings = make_settings(
        private_pg.database(f"faults_{uuid.uuid4().hex[:8]}"), db_timeout_seconds=2.0, db_pool_size=1, db_max_overflow=0
    )
    migrate(settings)
    with serve_in_thread(create_app(with_free_mcp_port(settings))) as base:
        assert httpx.get(f"{base}/api/conversations", headers=ALICE).status_code == 200
        private_pg.stall()
        try:
            started = time.monotonic()
            with ThreadPoolExecutor(6) as pool:
                answers = list(
                    pool.map(lambda _: httpx.get(f"{base}/api/conversations", headers=ALICE, timeout=60), range(6))
                )
            waited = time.monotonic() - started
        finally:
            private_pg.resume()
        for response in answers:
            _unavailable(response)
        assert waited < settings.db_timeout_seconds + 3, waited  # one after the other would be 6 x 2 s


async def test_a_busy_database_queues_units_without_failing_them(engine: Engine) -> None:
    """Slow but answering is not stalled: units queued behind slow ones wait past the bound (which
    counts from when a unit runs) and all succeed."""
    db = Database(engine, timeout=2.0, connections=1)
    started = time.monotonic()
    answers = await asyncio.gather(
        *(db.run(lambda c: c.execute(text("SELECT 1 FROM pg_sleep(0.8)")).scalar_one()) for _ in range(4))
    )
    assert answers == [1, 1, 1, 1]
    assert time.monotonic() - started > 3  # one at a time, so the last waited longer than the bound
