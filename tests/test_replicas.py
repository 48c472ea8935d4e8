"""Several real API processes over one PostgreSQL and one MCP server: any replica serves any turn.

Real `chat-backend serve` / `chat-backend mcp` processes, real HTTP, the offline model. A conversation
alternates between replicas and stays whole; a replica killed mid-turn loses no acknowledged turn and
blocks the conversation only for its (shortened) lease; a restarted replica changes nothing.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.pool import NullPool

from tests.conftest import TEST_MCP_SECRET
from tests.support import seed
from tests.support.servers import free_port, run_process
from tests.support.tokens import TEST_AUTH_SECRET, auth

LEASE_SECONDS = 2.0  # TURN_LEASE_SECONDS for the crash test: a killed replica blocks for ~2 s, not 30


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]


@dataclass
class Stack:
    env: dict[str, str]
    mcp: subprocess.Popen[bytes]
    apis: list[Replica]
    exits: ExitStack

    def start_api(self) -> Replica:
        """One more `chat-backend serve` on a new port, stopped with the stack."""
        port = free_port()
        proc = self.exits.enter_context(_api_process(self.env, port))
        return Replica(f"http://127.0.0.1:{port}", proc)


def _api_process(env: dict[str, str], port: int) -> AbstractContextManager[subprocess.Popen[bytes]]:
    return run_process(["serve"], {**env, "API_PORT": str(port)}, f"http://127.0.0.1:{port}/health")


def _enter_parallel(exits: ExitStack, managers: list[AbstractContextManager[Any]]) -> list[Any]:
    """Enter context managers concurrently (process start-up is mostly imports); exit them with `exits`."""
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(manager.__enter__) for manager in managers]
    results: list[Any] = []
    error: BaseException | None = None
    for manager, future in zip(managers, futures, strict=True):
        try:
            results.append(future.result())
            exits.push(manager)
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
    return results


def _resume(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)


@contextmanager
def stack(database_url: str, replicas: int = 2, **extra_env: str) -> Iterator[Stack]:
    mcp_port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "APP_ENV": "production",
        "AUTH_SECRET": TEST_AUTH_SECRET,
        "MCP_TOKEN_SECRET": TEST_MCP_SECRET,
        "CHAT_MODEL": "offline",
        "MCP_URL": f"http://127.0.0.1:{mcp_port}/mcp",
        "LOG_LEVEL": "WARNING",
        "DB_POOL_SIZE": "3",
        **extra_env,
    }
    ports = [free_port() for _ in range(replicas)]
    with ExitStack() as exits:
        managers = [
            run_process(["mcp"], env, f"http://127.0.0.1:{mcp_port}/health"),
            *(_api_process(env, port) for port in ports),
        ]
        mcp, *procs = _enter_parallel(exits, managers)
        exits.callback(_resume, mcp)  # never leave a paused MCP server behind (the crash test pauses it)
        apis = [Replica(f"http://127.0.0.1:{port}", proc) for port, proc in zip(ports, procs, strict=True)]
        yield Stack(env, mcp, apis, exits)


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(database_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    # Minted per test: a module-level token (5 min TTL) could expire during a long suite run.
    with httpx.Client(timeout=30.0, headers=auth("alice")) as client:
        yield client


@dataclass
class Chat:
    """A client that sends each turn to a chosen replica and fails over like a load balancer would.

    A replica that cannot be reached: the same request (same `client_message_id`) goes to the next one.
    409 (a turn still holds the conversation): wait and try again. Both are safe because the request is
    idempotent on `client_message_id`.
    """

    http: httpx.Client
    conversation_id: str | None = None
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: dict[str, list[int | str]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def next_body(self, message: str) -> dict[str, Any]:
        cmid = f"cmid-{next(self._ids)}"
        return {"message": message, "conversation_id": self.conversation_id, "client_message_id": cmid}

    def turn(self, urls: list[str], message: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        body = body or self.next_body(message)
        seen = self.statuses.setdefault(body["client_message_id"], [])
        deadline = time.monotonic() + 20
        for url in itertools.cycle(urls):
            assert time.monotonic() < deadline, f"turn {body} never succeeded: {seen}"
            try:
                response = self.http.post(f"{url}/api/chat", json=body)
            except httpx.TransportError as exc:
                seen.append(type(exc).__name__)
                continue
            seen.append(response.status_code)
            if response.status_code == 409:
                assert response.json()["code"] == "conversation_busy"
                time.sleep(0.2)
                continue
            assert response.status_code == 200, response.text
            data: dict[str, Any] = response.json()
            self.conversation_id = self.conversation_id or data["conversation_id"]
            assert data["conversation_id"] == self.conversation_id
            self.acked[body["client_message_id"]] = data
            return data
        raise AssertionError("unreachable")


# --- checks ---------------------------------------------------------------------------------------


def stored_messages(db: Engine, conversation_id: str) -> list[dict[str, Any]]:
    return seed.stored_messages(db, conversation_id, "id, seq, role, status, client_message_id, reply_to")


def task_titles(db: Engine, user_id: str = "alice") -> list[str]:
    with db.connect() as conn:
        query = sa.text("SELECT title FROM task WHERE user_id = :u ORDER BY id")
        return list(conn.execute(query, {"u": user_id}).scalars())


def assert_whole(db: Engine, chat: Chat, turns: int) -> list[dict[str, Any]]:
    """Gapless seq, user/assistant alternating, every acknowledged turn stored with its reply, no duplicates."""
    assert chat.conversation_id is not None
    rows = stored_messages(db, chat.conversation_id)
    assert [row["seq"] for row in rows] == list(range(1, 2 * turns + 1))
    assert [row["role"] for row in rows] == ["user", "assistant"] * turns
    for question, answer in itertools.pairwise(rows):
        if question["role"] == "user":
            assert answer["reply_to"] == question["id"]
            assert answer["status"] == "complete"
    cmids = [row["client_message_id"] for row in rows if row["role"] == "user"]
    assert len(cmids) == len(set(cmids)) == turns  # one user message per client_message_id
    by_cmid = {row["client_message_id"]: i for i, row in enumerate(rows) if row["role"] == "user"}
    assert set(chat.acked) == set(by_cmid)
    for cmid, data in chat.acked.items():
        assert str(rows[by_cmid[cmid] + 1]["id"]) == data["message_id"]
    return rows


def read_conversation(http: httpx.Client, url: str, conversation_id: str) -> dict[str, Any]:
    response = http.get(f"{url}/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def listed(data: dict[str, Any]) -> list[str]:
    return [task["title"] for task in data["tool_calls"][0]["result"]["tasks"]]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- tests ----------------------------------------------------------------------------------------


def test_conversation_alternates_between_replicas(database_url: str, db: Engine, http: httpx.Client) -> None:
    with stack(database_url) as s:
        one, two = (replica.url for replica in s.apis)
        chat = Chat(http)
        assert chat.turn([one], "add buy milk")["tool_calls"][0]["result"]["task_id"] == 1
        assert chat.turn([two], "add call mom")["tool_calls"][0]["result"]["task_id"] == 2
        # Replica 1 sees the task replica 2 added, in the same conversation.
        assert listed(chat.turn([one], "show my tasks")) == ["buy milk", "call mom"]
        assert chat.turn([two], "complete task 1")["tool_calls"][0]["result"]["status"] == "completed"
        assert listed(chat.turn([one], "show pending tasks")) == ["call mom"]
        assert listed(chat.turn([two], "show completed tasks")) == ["buy milk"]
        assert all(statuses == [200] for statuses in chat.statuses.values())

        rows = assert_whole(db, chat, turns=6)
        assert chat.conversation_id is not None
        from_one = read_conversation(http, one, chat.conversation_id)
        from_two = read_conversation(http, two, chat.conversation_id)
        assert from_one == from_two
        assert from_one["title"] == "add buy milk"
        assert [m["id"] for m in from_one["messages"]] == [str(row["id"]) for row in rows]
        for url in (one, two):
            summaries = http.get(f"{url}/api/conversations").json()["data"]
            assert [(c["id"], c["message_count"]) for c in summaries] == [(chat.conversation_id, 12)]


def test_killed_replica_loses_no_acknowledged_turn(database_url: str, db: Engine, http: httpx.Client) -> None:
    with stack(database_url, TURN_LEASE_SECONDS=str(LEASE_SECONDS)) as s:
        one, two = s.apis
        chat = Chat(http)
        chat.turn([one.url], "add buy milk")
        chat.turn([two.url], "add call mom")
        assert listed(chat.turn([one.url], "show my tasks")) == ["buy milk", "call mom"]
        chat.turn([two.url], "complete task 1")
        cid = chat.conversation_id
        assert cid is not None

        # SIGKILL replica 1 in the middle of a turn. Pausing the MCP server holds the turn after its
        # first transaction (user message stored, lease taken) and before any tool runs.
        body = chat.next_body("add walk dog")
        cmid = body["client_message_id"]
        os.kill(s.mcp.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(1) as pool:
                submitted = time.monotonic()
                in_flight = pool.submit(httpx.post, f"{one.url}/api/chat", json=body, headers=http.headers, timeout=30)
                wait_for(lambda: any(r["client_message_id"] == cmid for r in stored_messages(db, cid)))
                one.proc.kill()
                one.proc.wait(timeout=10)
                with pytest.raises(httpx.TransportError):
                    in_flight.result(timeout=10)
        finally:
            os.kill(s.mcp.pid, signal.SIGCONT)
        assert one.proc.returncode == -signal.SIGKILL
        orphan = stored_messages(db, cid)[-1]
        assert (orphan["role"], orphan["client_message_id"]) == ("user", cmid)  # no reply yet

        # The client retries the unacknowledged turn on replica 2: 409 while the dead turn's lease
        # lasts, then the turn runs once, answering the stored user message.
        started = time.monotonic()
        retried = chat.turn([two.url], "add walk dog", body)
        assert time.monotonic() - started < LEASE_SECONDS + 5
        statuses = chat.statuses[cmid]
        assert set(statuses) <= {409, 200}
        if started < submitted + LEASE_SECONDS - 0.2:  # the lease (taken after `submitted`) was surely live
            assert statuses[0] == 409
        assert retried["tool_calls"][0]["result"] == {"task_id": 3, "status": "created", "title": "walk dog"}
        assert listed(chat.turn([two.url], "show my tasks")) == ["buy milk", "call mom", "walk dog"]

        # A replacement replica serves a turn, then dies between requests: the client's next turn
        # for it fails to connect and goes to replica 2 with the same client_message_id.
        three = s.start_api()
        chat.turn([three.url], "add pay rent")
        three.proc.kill()
        three.proc.wait(timeout=10)
        body = chat.next_body("show pending tasks")
        failed_over = chat.turn([three.url, two.url], "show pending tasks", body)
        assert listed(failed_over) == ["call mom", "walk dog", "pay rent"]
        assert chat.statuses[body["client_message_id"]] == ["ConnectError", 200]

        # Everything acknowledged is stored once with its reply; replica 2 kept serving throughout.
        assert_whole(db, chat, turns=8)
        assert task_titles(db) == ["buy milk", "call mom", "walk dog", "pay rent"]
        assert http.get(f"{two.url}/health/ready").status_code == 200
        assert len(read_conversation(http, two.url, cid)["messages"]) == 16


def test_restarted_replica_changes_nothing(database_url: str, db: Engine, http: httpx.Client) -> None:
    with stack(database_url) as s:
        one, two = s.apis
        chat = Chat(http)
        chat.turn([one.url], "add buy milk")
        chat.turn([two.url], "add call mom")
        assert chat.conversation_id is not None
        before = read_conversation(http, one.url, chat.conversation_id)

        # A normal stop: uvicorn drains, shuts down, then re-raises the SIGTERM it caught.
        one.proc.terminate()
        assert one.proc.wait(timeout=15) in (0, -signal.SIGTERM)
        fresh = s.start_api()
        assert fresh.url != one.url
        assert read_conversation(http, fresh.url, chat.conversation_id) == before

        assert listed(chat.turn([fresh.url], "show my tasks")) == ["buy milk", "call mom"]
        chat.turn([fresh.url], "complete task 2")
        assert listed(chat.turn([two.url], "show completed tasks")) == ["call mom"]
        assert_whole(db, chat, turns=5)
        assert read_conversation(http, fresh.url, chat.conversation_id) == read_conversation(
            http, two.url, chat.conversation_id
        )
