"""The MCP task server over real HTTP, driven by real MCP clients (the mcp SDK and the Agents SDK)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from agents.mcp import MCPServerStreamableHttp
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from sqlalchemy import Engine, text
from sqlmodel import Session, col, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backend import __version__
from backend.agent.mcp_client import TURN_CALL, TaskServer, TurnCall
from backend.cli import mint_user_token
from backend.config import MCP_AUDIENCE, MCP_ISSUER, Settings
from backend.db import make_engine
from backend.delegation import CALL_META, mint_operator_token, mint_turn_token
from backend.failures import McpUnavailable
from backend.mcp_server.app import create_mcp_app
from backend.mcp_server.task_store import purge_tool_calls
from backend.models import Task
from backend.pgserver import with_database
from tests.conftest import TEST_MCP_SECRET, make_settings
from tests.support.node import npm_project
from tests.support.servers import free_port, run_process, serve_in_thread

TOOLS = {"add_task", "list_tasks", "complete_task", "update_task", "delete_task"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Running:
    base: str
    url: str
    settings: Settings


@pytest.fixture
def server(database_url: str) -> Iterator[Running]:
    port = free_port()
    settings = make_settings(
        database_url, mcp_url=f"http://127.0.0.1:{port}/mcp", mcp_allowed_hosts=["mcp", "tasks.internal:9000"]
    )
    with serve_in_thread(create_mcp_app(settings), port=port) as base:
        yield Running(base=base, url=f"{base}/mcp", settings=settings)


@pytest.fixture
def engine(server: Running) -> Iterator[Engine]:
    eng = make_engine(server.settings)
    yield eng
    eng.dispose()


def bearer(user: str) -> dict[str, str]:
    """An operator token, as `chat-backend token --mcp` mints (no turn, so no lease to check)."""
    return {"Authorization": f"Bearer {mint_operator_token(TEST_MCP_SECRET, user)}"}


@asynccontextmanager
async def sdk_client(url: str, user: str) -> AsyncIterator[Client]:
    """The mcp SDK's client; headers go on the httpx2 client handed to the streamable HTTP transport."""
    async with (
        httpx2.AsyncClient(headers=bearer(user)) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


def error_text(result: Any) -> str:
    assert result.is_error, result
    text: str = result.content[0].text
    return text


def error_free_text(result: Any) -> str:
    assert not result.is_error, result
    text: str = result.content[0].text
    return text


def task_row(engine: Engine, task_id: int, user: str = "alice") -> Task | None:
    """The user's task with this number (task_id is the per-user number)."""
    with Session(engine) as session:
        return session.exec(select(Task).where(Task.user_id == user, Task.number == task_id)).first()


# --- tools: happy paths ----------------------------------------------------------------------------


async def test_every_tool_over_the_sdk_client(server: Running, engine: Engine) -> None:
    async with sdk_client(server.url, "alice") as client:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        assert all(tool.description and tool.output_schema for tool in listed.tools)

        milk = await client.call_tool("add_task", {"title": "  Buy milk  "})
        assert not milk.is_error
        assert milk.structured_content == {"task_id": milk.structured_content["task_id"], "status": "created",
                                           "title": "Buy milk"}  # fmt: skip
        milk_id = milk.structured_content["task_id"]
        bread = await client.call_tool("add_task", {"title": "Bread", "description": "wholemeal"})
        bread_id = bread.structured_content["task_id"]
        assert bread.structured_content == {"task_id": bread_id, "status": "created", "title": "Bread"}
        before = task_row(engine, milk_id)
        assert before is not None
        assert (before.user_id, before.description) == ("alice", None)

        done = await client.call_tool("complete_task", {"task_id": milk_id})
        assert done.structured_content == {"task_id": milk_id, "status": "completed", "title": "Buy milk"}
        after = task_row(engine, milk_id)
        assert after is not None
        assert after.completed
        assert after.updated_at > before.updated_at

        listing = await client.call_tool("list_tasks", {})
        tasks = listing.structured_content["tasks"]
        assert [(t["task_id"], t["title"], t["description"], t["completed"]) for t in tasks] == [
            (milk_id, "Buy milk", None, True),
            (bread_id, "Bread", "wholemeal", False),
        ]
        assert all(isinstance(t["created_at"], str) for t in tasks)
        # The text content mirrors the structured result for clients that only read text.
        assert json.loads(error_free_text(listing)) == listing.structured_content

        pending = await client.call_tool("list_tasks", {"status": "pending"})
        assert [t["task_id"] for t in pending.structured_content["tasks"]] == [bread_id]
        completed = await client.call_tool("list_tasks", {"status": "completed"})
        assert [t["task_id"] for t in completed.structured_content["tasks"]] == [milk_id]

        renamed = await client.call_tool("update_task", {"task_id": bread_id, "title": "Rye bread"})
        assert renamed.structured_content == {"task_id": bread_id, "status": "updated", "title": "Rye bread"}
        row = task_row(engine, bread_id)
        assert row is not None
        assert (row.title, row.description) == ("Rye bread", "wholemeal")
        await client.call_tool("update_task", {"task_id": bread_id, "description": "from the bakery"})
        row = task_row(engine, bread_id)
        assert row is not None
        assert (row.title, row.description) == ("Rye bread", "from the bakery")
        await client.call_tool("update_task", {"task_id": bread_id, "description": ""})  # "" clears it
        row = task_row(engine, bread_id)
        assert row is not None
        assert row.description is None

        deleted = await client.call_tool("delete_task", {"task_id": milk_id})
        assert deleted.structured_content == {"task_id": milk_id, "status": "deleted", "title": "Buy milk"}
        assert task_row(engine, milk_id) is None
        again = await client.call_tool("delete_task", {"task_id": milk_id})
        assert error_text(again).endswith(f"task {milk_id} not found")
        remaining = await client.call_tool("list_tasks", {"status": "all"})
        assert [t["task_id"] for t in remaining.structured_content["tasks"]] == [bread_id]


async def test_agents_sdk_client(server: Running) -> None:
    params: Any = {"url": server.url, "headers": bearer("bob")}
    async with MCPServerStreamableHttp(params=params, name="tasks", use_structured_content=True) as mcp:
        tools = await mcp.list_tools()
        assert {tool.name for tool in tools} == TOOLS
        added = await mcp.call_tool("add_task", {"title": "Call mum", "description": "Sunday"})
        assert not added.is_error
        task_id = added.structured_content["task_id"]
        assert added.structured_content == {"task_id": task_id, "status": "created", "title": "Call mum"}
        done = await mcp.call_tool("complete_task", {"task_id": task_id})
        assert done.structured_content["status"] == "completed"
        listing = await mcp.call_tool("list_tasks", {"status": "completed"})
        (task,) = listing.structured_content["tasks"]
        assert (task["task_id"], task["title"], task["description"], task["completed"]) == (
            task_id,
            "Call mum",
            "Sunday",
            True,
        )
        missing = await mcp.call_tool("delete_task", {"task_id": task_id + 1})
        assert error_text(missing).endswith(f"task {task_id + 1} not found")


async def test_no_tool_schema_names_a_user(server: Running) -> None:
    def property_names(schema: Any) -> Iterator[str]:
        if isinstance(schema, dict):
            for key, value in schema.items():
                if key == "properties" and isinstance(value, dict):
                    yield from value
                yield from property_names(value)
        elif isinstance(schema, list):
            for item in schema:
                yield from property_names(item)

    async with sdk_client(server.url, "alice") as client:
        tools = (await client.list_tools()).tools
    assert len(tools) == len(TOOLS)
    for tool in tools:
        names = {name.lower() for name in property_names(tool.input_schema)}
        assert names, tool.name
        assert not {n for n in names if "user" in n or "owner" in n}, (tool.name, names)
        assert "user_id" not in json.dumps(tool.input_schema)


# --- isolation -------------------------------------------------------------------------------------


async def test_users_cannot_touch_each_others_tasks(server: Running, engine: Engine) -> None:
    async with sdk_client(server.url, "alice") as alice:
        added = await alice.call_tool("add_task", {"title": "Alice's secret", "description": "private"})
    task_id = added.structured_content["task_id"]
    before = task_row(engine, task_id)
    assert before is not None

    missing_id = task_id + 1000
    async with sdk_client(server.url, "mallory") as mallory:
        for status in ("all", "pending", "completed"):
            listing = await mallory.call_tool("list_tasks", {"status": status})
            assert listing.structured_content == {"tasks": []}
        # An argument naming a user is not part of any schema: an error the model sees, not ignored.
        for name, arguments in [("list_tasks", {}), ("complete_task", {"task_id": task_id})]:
            sneaky = await mallory.call_tool(name, {**arguments, "user_id": "alice"})
            assert error_text(sneaky) == f"Error executing tool {name}: unexpected argument user_id"

        attempts = [
            ("complete_task", {}),
            ("update_task", {"title": "pwned"}),
            ("update_task", {"description": "pwned"}),
            ("delete_task", {}),
        ]
        for name, extra in attempts:
            foreign = await mallory.call_tool(name, {"task_id": task_id, **extra})
            absent = await mallory.call_tool(name, {"task_id": missing_id, **extra})
            # Another user's task and a missing one are indistinguishable.
            assert error_text(foreign) == f"Error executing tool {name}: task {task_id} not found"
            assert error_text(absent) == error_text(foreign).replace(str(task_id), str(missing_id))
            assert foreign.structured_content is None

        # Numbers are per user: mallory's first task is her task 1, and "task 1" is hers alone.
        own = await mallory.call_tool("add_task", {"title": "Mallory's own"})
        assert own.structured_content["task_id"] == task_id == 1
        done = await mallory.call_tool("complete_task", {"task_id": 1})
        assert done.structured_content == {"task_id": 1, "status": "completed", "title": "Mallory's own"}

    after = task_row(engine, task_id)
    assert after is not None
    assert after.model_dump() == before.model_dump()  # nothing changed, not even updated_at
    async with sdk_client(server.url, "alice") as alice:
        listing = await alice.call_tool("list_tasks", {})
    assert [(t["task_id"], t["title"], t["completed"]) for t in listing.structured_content["tasks"]] == [
        (task_id, "Alice's secret", False)
    ]


# --- per-user task numbers ----------------------------------------------------------------------------


async def test_task_numbers_are_per_user_gapless_under_concurrency_and_never_reused(
    server: Running, engine: Engine
) -> None:
    async with (
        sdk_client(server.url, "alice") as alice_1,
        sdk_client(server.url, "alice") as alice_2,
        sdk_client(server.url, "bob") as bob,
    ):
        # 38 adds at once, from three clients of two users: real concurrent requests and transactions.
        calls = [alice_1.call_tool("add_task", {"title": f"a1-{i}"}) for i in range(15)]
        calls += [alice_2.call_tool("add_task", {"title": f"a2-{i}"}) for i in range(15)]
        calls += [bob.call_tool("add_task", {"title": f"b-{i}"}) for i in range(8)]
        results = [r.structured_content for r in await asyncio.gather(*calls)]
        alices, bobs = results[:30], results[30:]
        assert sorted(r["task_id"] for r in alices) == list(range(1, 31))
        assert sorted(r["task_id"] for r in bobs) == list(range(1, 9))
        # Each answer names the task it made.
        listing = (await alice_1.call_tool("list_tasks", {})).structured_content["tasks"]
        assert {t["task_id"]: t["title"] for t in listing} == {r["task_id"]: r["title"] for r in alices}
        assert [t["task_id"] for t in listing] == list(range(1, 31))  # listed by number

        # A deleted number is never handed out again: "task 30" in an old message names no other task.
        await alice_1.call_tool("delete_task", {"task_id": 30})
        await alice_1.call_tool("delete_task", {"task_id": 7})
        after = await alice_2.call_tool("add_task", {"title": "after the deletes"})
        assert after.structured_content["task_id"] == 31
        gone = await alice_2.call_tool("complete_task", {"task_id": 30})
        assert error_text(gone) == "Error executing tool complete_task: task 30 not found"
    with Session(engine) as session:
        numbers = session.exec(select(Task.user_id, Task.number).order_by(col(Task.user_id), col(Task.number))).all()
    assert [n for u, n in numbers if u == "alice"] == [*range(1, 7), *range(8, 30), 31]
    assert [n for u, n in numbers if u == "bob"] == list(range(1, 9))


# --- authentication --------------------------------------------------------------------------------


def _forged(claims: dict[str, Any], secret: str = TEST_MCP_SECRET) -> str:
    """An operator token for alice, with `claims` on top (None deletes a claim)."""
    base: dict[str, Any] = {"iss": MCP_ISSUER, "aud": MCP_AUDIENCE, "sub": "alice", "scope": "tasks"}
    base |= {"use": "operator", "iat": now(), "exp": now() + 300}
    payload = {k: v for k, v in (base | claims).items() if v is not None}
    return jwt.encode(payload, secret, algorithm="HS256")


def now() -> int:
    return int(time.time())


def _lived(seconds: int) -> str:
    """An operator token whose exp - iat is exactly `seconds`."""
    issued = now()
    return _forged({"iat": issued, "exp": issued + seconds})


TURN_CLAIMS = {"use": "turn", "cid": str(uuid.uuid4()), "tid": str(uuid.uuid4()), "turn": "m1"}


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda s: _forged({"iat": now() - 400, "exp": now() - 60}), id="expired"),
        pytest.param(lambda s: _forged({"aud": "some-other-service"}), id="wrong-audience"),
        pytest.param(lambda s: _forged({"iss": "someone-else"}), id="wrong-issuer"),
        pytest.param(
            lambda s: mint_operator_token("another-secret-0123456789abcdef0123", "alice"), id="wrong-signature"
        ),
        pytest.param(lambda s: mint_user_token(s, "alice", 600), id="user-jwt"),
        pytest.param(
            lambda s: jwt.encode({"sub": "alice", "aud": MCP_AUDIENCE, "iss": MCP_ISSUER}, "", algorithm="none"),
            id="alg-none",
        ),
        pytest.param(lambda s: "not-a-jwt", id="garbage"),
        # Neither a turn token nor an operator token.
        pytest.param(lambda s: _forged({"use": None}), id="no-use"),
        pytest.param(lambda s: _forged({"use": "admin"}), id="unknown-use"),
        pytest.param(lambda s: _forged({**TURN_CLAIMS, "cid": None}), id="turn-without-cid"),
        pytest.param(lambda s: _forged({**TURN_CLAIMS, "tid": None}), id="turn-without-tid"),
        pytest.param(lambda s: _forged({**TURN_CLAIMS, "tid": "not-a-uuid"}), id="turn-bad-tid"),
        pytest.param(lambda s: _forged({"cid": TURN_CLAIMS["cid"]}), id="operator-naming-a-conversation"),
        # Operator tokens are short-lived: at most an hour between iat and exp.
        pytest.param(lambda s: _lived(3601), id="operator-lifetime-over-an-hour"),
        pytest.param(lambda s: _forged({"iat": None, "exp": now() + 60}), id="operator-without-iat"),
        pytest.param(lambda s: _forged({"iat": now() + 3000, "exp": now() + 3600}), id="operator-issued-in-future"),
        # A NumericDate is a number; PyJWT alone would coerce these strings.
        pytest.param(lambda s: _forged({"exp": str(now() + 300)}), id="string-exp"),
        pytest.param(lambda s: _forged({"iat": str(now())}), id="string-iat"),
    ],
)
def test_bad_tokens_are_rejected_with_401(server: Running, token: Any) -> None:
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token(server.settings)}"}
    response = httpx.post(server.url, json=INITIALIZE, headers=headers)
    assert response.status_code == 401
    # An invalid token reads as one, and names no OAuth metadata (there is no authorization server).
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert "resource_metadata" not in response.headers["www-authenticate"]
    assert response.json()["error"] == "invalid_token"


def test_forged_helper_makes_an_accepted_token(server: Running) -> None:
    # The 401s above are about the claim each case changes, not about the helper.
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {_lived(3600)}"}
    assert httpx.post(server.url, json=INITIALIZE, headers=headers).status_code == 200


def test_no_oauth_discovery_is_advertised(server: Running) -> None:
    response = httpx.post(server.url, json=INITIALIZE, headers=MCP_HEADERS)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="Authentication required"'
    )
    # Nothing an OAuth client would look for is served: no metadata naming a missing authorization server.
    for path in (
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
        "/register",
        "/authorize",
    ):
        assert httpx.get(f"{server.base}{path}").status_code == 404, path


def test_operator_token_lifetime_is_bounded_when_minting() -> None:
    with pytest.raises(ValueError, match="at most 3600 seconds"):
        mint_operator_token(TEST_MCP_SECRET, "alice", ttl_seconds=3601)
    claims = jwt.decode(mint_operator_token(TEST_MCP_SECRET, "alice"), options={"verify_signature": False})
    assert claims["use"] == "operator" and claims["exp"] - claims["iat"] == 300
    assert not {"cid", "tid", "turn"} & set(claims)


def test_no_token_is_rejected_with_401(server: Running) -> None:
    response = httpx.post(server.url, json=INITIALIZE, headers=MCP_HEADERS)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    # A token in another scheme is not a bearer token.
    basic = httpx.post(server.url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": "Basic YTpi"})
    assert basic.status_code == 401
    # The valid token is accepted on the same raw request (so the 401s above are about the token).
    ok = httpx.post(server.url, json=INITIALIZE, headers={**MCP_HEADERS, **bearer("alice")})
    assert ok.status_code == 200, ok.text
    assert ok.json()["result"]["serverInfo"]["name"] == "chat-backend-tasks"


async def test_sdk_client_without_token_fails(server: Running) -> None:
    # The SDK surfaces the 401 as an MCPError inside the transport's task-group exception group.
    with pytest.raises(ExceptionGroup) as info:
        async with Client(server.url) as client:
            await client.list_tools()
    assert info.group_contains(MCPError)


# --- bad arguments ---------------------------------------------------------------------------------

TITLE_RULE = "title must be 1-200 characters"
TASK_ID_RULE = "task_id must be a positive whole number"
BAD_ARGUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("add_task", {"title": ""}, TITLE_RULE),
    ("add_task", {"title": "   \t "}, TITLE_RULE),
    ("add_task", {"title": "x" * 201}, TITLE_RULE),
    ("add_task", {"title": "x" * 200_000}, TITLE_RULE),
    ("add_task", {"title": 42}, TITLE_RULE),
    ("add_task", {"title": ["a", "b"]}, TITLE_RULE),
    ("add_task", {"title": None}, TITLE_RULE),
    ("add_task", {}, "title is required"),
    ("add_task", {"title": "milk\x00"}, "title must not contain NUL characters"),
    ("add_task", {"title": "ok", "description": "d" * 1001}, "description must be at most 1000 characters"),
    ("add_task", {"title": "ok", "description": "a\x00b"}, "description must not contain NUL characters"),
    (
        "add_task",
        {"title": "", "description": "d" * 1001},
        f"{TITLE_RULE}; description must be at most 1000 characters",
    ),
    ("add_task", {"title": "ok", "user_id": "bob"}, "unexpected argument user_id"),
    (
        "add_task",
        {"title": "ok", "owner": "bob", "user_id": "bob"},
        "unexpected argument owner; unexpected argument user_id",
    ),
    ("list_tasks", {"status": "done"}, "status must be 'all', 'pending' or 'completed'"),
    ("list_tasks", {"status": 1}, "status must be 'all', 'pending' or 'completed'"),
    ("list_tasks", {"user_id": "bob"}, "unexpected argument user_id"),
    ("complete_task", {"task_id": 0}, TASK_ID_RULE),
    ("complete_task", {"task_id": -3}, TASK_ID_RULE),
    ("complete_task", {"task_id": "abc"}, TASK_ID_RULE),
    ("complete_task", {"task_id": 1.5}, TASK_ID_RULE),
    ("complete_task", {"task_id": 2**40}, TASK_ID_RULE),
    ("complete_task", {}, "task_id is required"),
    ("complete_task", {"id": 1}, "task_id is required; unexpected argument id"),
    ("update_task", {"task_id": 1}, "nothing to update: give a new title and/or description"),
    (
        "update_task",
        {"task_id": 1, "title": None, "description": None},
        "nothing to update: give a new title and/or description",
    ),
    ("update_task", {"task_id": 1, "title": "  "}, TITLE_RULE),
    ("update_task", {"task_id": 1, "description": "z" * 1001}, "description must be at most 1000 characters"),
    ("update_task", {"task_id": 1, "title": "a\x00"}, "title must not contain NUL characters"),
    ("delete_task", {"task_id": "1; DROP TABLE task"}, TASK_ID_RULE),
    ("delete_task", {"task_id": None}, TASK_ID_RULE),
    ("delete_task", {"task_id": 1, "user_id": "bob"}, "unexpected argument user_id"),
]


async def test_bad_arguments_are_plain_tool_errors(server: Running, engine: Engine) -> None:
    async with sdk_client(server.url, "alice") as client:
        for name, arguments, expected in BAD_ARGUMENTS:
            result = await client.call_tool(name, arguments)
            # One plain sentence per argument: no pydantic type names, URLs, versions or echoed input.
            assert error_text(result) == f"Error executing tool {name}: {expected}", (name, arguments)
        # Nothing was written, and the server still works.
        assert (await client.call_tool("list_tasks", {})).structured_content == {"tasks": []}
        ok = await client.call_tool("add_task", {"title": "still fine"})
        assert not ok.is_error
    with Session(engine) as session:
        assert [t.title for t in session.exec(select(Task).order_by(col(Task.id)))] == ["still fine"]


async def test_tool_listing_is_tidy_and_closed(server: Running) -> None:
    async with sdk_client(server.url, "alice") as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    titles = {name: tool.title for name, tool in tools.items()}
    assert titles == {
        "add_task": "Add task",
        "list_tasks": "List tasks",
        "complete_task": "Complete task",
        "update_task": "Update task",
        "delete_task": "Delete task",
    }
    for tool in tools.values():
        assert tool.input_schema["additionalProperties"] is False, tool.name
        assert tool.description and tool.description == tool.description.strip()
        assert not any(line.startswith(" ") for line in tool.description.splitlines()), tool.description
        assert tool.annotations is not None and tool.annotations.open_world_hint is False
    assert tools["add_task"].input_schema["required"] == ["title"]
    assert tools["list_tasks"].annotations.read_only_hint is True
    assert tools["delete_task"].annotations.destructive_hint is True


# --- transport: host checks and health -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("mcp", 200),
        ("mcp:8001", 200),
        ("tasks.internal:9000", 200),
        ("localhost:1234", 200),
        ("tasks.internal:9001", 421),
        ("evil.example", 421),
        ("evil.example:8001", 421),
    ],
)
def test_host_header_checks(server: Running, host: str, status: int) -> None:
    headers = {**MCP_HEADERS, **bearer("alice"), "Host": host}
    response = httpx.post(server.url, json=INITIALIZE, headers=headers)
    assert response.status_code == status, response.text


def test_foreign_origin_is_refused(server: Running) -> None:
    headers = {**MCP_HEADERS, **bearer("alice"), "Origin": "http://evil.example"}
    assert httpx.post(server.url, json=INITIALIZE, headers=headers).status_code == 403
    local = {**MCP_HEADERS, **bearer("alice"), "Origin": "http://localhost:6274"}  # MCP Inspector's origin
    assert httpx.post(server.url, json=INITIALIZE, headers=local).status_code == 200


def test_health_and_ready(server: Running) -> None:
    health = httpx.get(f"{server.base}/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": __version__}
    ready = httpx.get(f"{server.base}/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_ready_is_503_without_a_database(database_url: str) -> None:
    port = free_port()
    missing = with_database(database_url, "no_such_database_for_mcp")
    settings = make_settings(missing, mcp_url=f"http://127.0.0.1:{port}/mcp")
    with serve_in_thread(create_mcp_app(settings), port=port) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        ready = httpx.get(f"{base}/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "checks": {"database": False}}


# --- the real `chat-backend mcp` process -----------------------------------------------------------


async def test_cli_process_serves_the_tools(database_url: str) -> None:
    port = free_port()
    env = {
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "MCP_URL": f"http://127.0.0.1:{port}/mcp",
        "MCP_TOKEN_SECRET": TEST_MCP_SECRET,
        "LOG_LEVEL": "WARNING",
    }
    # The token the README tells people to use: `chat-backend token --mcp --user carol`.
    minted = subprocess.run(
        [sys.executable, "-m", "backend.cli", "token", "--mcp", "--user", "carol"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    token = minted.stdout.strip()
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", token)

    with run_process(["mcp"], env, f"http://127.0.0.1:{port}/health"):
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as client,
        ):
            added = await client.call_tool("add_task", {"title": "from the CLI"})
            assert added.structured_content["status"] == "created"
            listing = await client.call_tool("list_tasks", {})
        assert [t["title"] for t in listing.structured_content["tasks"]] == ["from the CLI"]
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200

    eng = make_engine(make_settings(database_url))
    try:
        with Session(eng) as session:
            row = session.exec(select(Task)).one()
        assert (row.user_id, row.title) == ("carol", "from the CLI")
    finally:
        eng.dispose()


# --- the TypeScript MCP SDK (what MCP Inspector and Node agents use) --------------------------------------

TS_CLIENT = Path(__file__).parent / "js" / "mcp"


@pytest.fixture(scope="session")
def ts_client() -> Path:
    """tests/js/mcp with its locked npm packages installed (`npm ci` once; kept between runs)."""
    return npm_project("mcp")


def test_typescript_sdk_client(server: Running, engine: Engine, ts_client: Path) -> None:
    good, bad = mint_operator_token(TEST_MCP_SECRET, "dana"), _forged({"aud": "some-other-service"})
    run = subprocess.run(
        ["node", "client.mjs", server.url, good, bad], cwd=ts_client, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["serverVersion"]["name"] == "chat-backend-tasks"

    tools = {tool["name"]: tool for tool in out["tools"]}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool["title"] and tool["title"][0].isupper(), tool
        assert tool["inputSchema"]["additionalProperties"] is False, tool
        assert not any(line.startswith(" ") for line in tool["description"].splitlines()), tool
    assert tools["complete_task"]["inputSchema"]["required"] == ["task_id"]

    assert out["added"]["structuredContent"] == {"task_id": 1, "status": "created", "title": "from TypeScript"}
    assert out["second"]["structuredContent"]["task_id"] == 2
    listed = out["listed"]["structuredContent"]["tasks"]
    assert [(t["task_id"], t["title"], t["completed"]) for t in listed] == [
        (1, "from TypeScript", False),
        (2, "and another", False),
    ]
    assert out["extra"]["isError"] is True
    assert out["extra"]["content"][0]["text"] == "Error executing tool list_tasks: unexpected argument user_id"
    assert task_count(engine, "dana") == 2

    # A bad token: a plain 401 the SDK reports as such, with nothing to start OAuth discovery from.
    assert out["badToken"]["connected"] is False
    assert out["badToken"]["code"] == 401, out["badToken"]
    (refusal,) = out["unauthorized"]
    assert refusal["error"] == "invalid_token"
    assert refusal["resourceMetadataUrl"] is None and refusal["scope"] is None
    assert refusal["wwwAuthenticate"].startswith('Bearer error="invalid_token"')
    assert refusal["body"]["error"] == "invalid_token"
    assert all(request["url"] == server.url for request in out["requests"]), out["requests"]


# --- a re-run turn does not repeat its task changes ---------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """A conversation turn as the API leaves it while the turn runs: conversation.turn_id + lease."""

    user: str
    conversation_id: uuid.UUID
    turn_id: uuid.UUID


def start_turn(engine: Engine, user: str, conversation_id: uuid.UUID | None = None) -> Lease:
    """Take the lease for a new turn, on a new conversation of `user` or on `conversation_id`."""
    lease = Lease(user, conversation_id or uuid.uuid4(), uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO conversation (id, user_id, title, last_seq, turn_id, turn_lease_until) "
                "VALUES (:cid, :user, 'Chat', 0, :tid, now() + interval '1 minute') "
                "ON CONFLICT (id) DO UPDATE SET turn_id = :tid, turn_lease_until = now() + interval '1 minute'"
            ),
            {"cid": lease.conversation_id, "user": user, "tid": lease.turn_id},
        )
    return lease


def end_turn(engine: Engine, lease: Lease, *, lease_until: str | None = None) -> None:
    """Release the lease as the API does when a turn ends (or let it lapse: `lease_until` in the past)."""
    with engine.begin() as conn:
        if lease_until is None:
            conn.execute(
                text("UPDATE conversation SET turn_id = NULL, turn_lease_until = NULL WHERE id = :cid"),
                {"cid": lease.conversation_id},
            )
        else:
            conn.execute(
                text(f"UPDATE conversation SET turn_lease_until = {lease_until} WHERE id = :cid"),
                {"cid": lease.conversation_id},
            )


def turn_token(lease: Lease, replay_scope: str = "m1", *, user: str | None = None) -> str:
    return mint_turn_token(
        TEST_MCP_SECRET,
        user or lease.user,
        conversation_id=lease.conversation_id,
        turn_id=lease.turn_id,
        replay_scope=replay_scope,
        ttl_seconds=150,
    )


@asynccontextmanager
async def token_client(url: str, token: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


@asynccontextmanager
async def turn_client(url: str, engine: Engine, user: str, replay_scope: str) -> AsyncIterator[Client]:
    """A client for one run of a turn: a fresh lease and token (a re-run of a turn gets both anew)."""
    async with token_client(url, turn_token(start_turn(engine, user), replay_scope)) as client:
        yield client


def task_count(engine: Engine, user: str) -> int:
    with Session(engine) as session:
        return len(session.exec(select(Task).where(col(Task.user_id) == user)).all())


async def test_same_turn_and_call_is_done_once(server: Running, engine: Engine) -> None:
    add = {"title": "Buy milk"}
    async with turn_client(server.url, engine, "alice", "turn-1") as first_run:
        first = (await first_run.call_tool("add_task", add, meta={CALL_META: 0})).structured_content
        second_of_run = (await first_run.call_tool("add_task", add, meta={CALL_META: 1})).structured_content
    assert first != second_of_run  # "add it twice" in one run adds two
    async with turn_client(server.url, engine, "alice", "turn-1") as rerun:  # the turn re-run with a new token
        again = (await rerun.call_tool("add_task", add, meta={CALL_META: 0})).structured_content
        deleted = await rerun.call_tool("delete_task", {"task_id": first["task_id"]}, meta={CALL_META: 0})
        deleted_again = await rerun.call_tool("delete_task", {"task_id": first["task_id"]}, meta={CALL_META: 0})
    assert again == first
    assert task_count(engine, "alice") == 1  # the second task of the first run; the first was deleted once
    # The recorded answer comes back, not "task N not found".
    assert deleted.structured_content == deleted_again.structured_content == {**first, "status": "deleted"}


async def test_replay_key_is_bound_to_user_turn_and_arguments(server: Running, engine: Engine) -> None:
    add = {"title": "Water plants"}
    async with turn_client(server.url, engine, "alice", "turn-9") as alice:
        original = (await alice.call_tool("add_task", add, meta={CALL_META: 0})).structured_content
        other_args = (await alice.call_tool("add_task", {"title": "Feed cat"}, meta={CALL_META: 0})).structured_content
    async with turn_client(server.url, engine, "alice", "turn-10") as next_turn:
        next_result = (await next_turn.call_tool("add_task", add, meta={CALL_META: 0})).structured_content
    async with turn_client(server.url, engine, "bob", "turn-9") as bob:
        bobs = (await bob.call_tool("add_task", add, meta={CALL_META: 0})).structured_content
    async with sdk_client(server.url, "alice") as operator:  # an operator token names no turn: no replay
        plain = [(await operator.call_tool("add_task", add, meta={CALL_META: 0})).structured_content for _ in range(2)]
    alices = [original, other_args, next_result, *plain]
    assert sorted(r["task_id"] for r in alices) == [1, 2, 3, 4, 5]  # five adds, five tasks
    assert bobs["task_id"] == 1  # bob's own first task
    assert task_count(engine, "alice") == 5 and task_count(engine, "bob") == 1


# --- a turn token is worth one turn ----------------------------------------------------------------------


async def test_turn_token_works_only_while_its_turn_holds_the_lease(server: Running, engine: Engine) -> None:
    lease = start_turn(engine, "alice")
    captured = turn_token(lease)
    async with token_client(server.url, captured) as client:
        added = await client.call_tool("add_task", {"title": "during the turn"})
        assert added.structured_content == {"task_id": 1, "status": "created", "title": "during the turn"}
        assert [t["task_id"] for t in (await client.call_tool("list_tasks", {})).structured_content["tasks"]] == [1]

    end_turn(engine, lease)  # the turn ended; someone kept its token
    ended = "this conversation turn has ended; the request was not carried out"
    async with token_client(server.url, captured) as client:
        calls: list[tuple[str, dict[str, Any]]] = [
            ("add_task", {"title": "after the turn"}),
            ("list_tasks", {}),
            ("complete_task", {"task_id": 1}),
            ("update_task", {"task_id": 1, "title": "pwned"}),
            ("delete_task", {"task_id": 1}),
        ]
        for name, arguments in calls:
            result = await client.call_tool(name, arguments)
            assert error_text(result) == f"Error executing tool {name}: {ended}"
    row = task_row(engine, 1)
    assert row is not None
    assert (row.title, row.completed, task_count(engine, "alice")) == ("during the turn", False, 1)

    # The next turn on the same conversation has a lease of its own: the old token is still refused.
    start_turn(engine, "alice", lease.conversation_id)
    async with token_client(server.url, captured) as client:
        assert error_text(await client.call_tool("delete_task", {"task_id": 1})).endswith(ended)
    assert task_count(engine, "alice") == 1


@pytest.mark.parametrize("case", ["lapsed", "other-users-conversation", "other-turn", "unknown-conversation"])
async def test_turn_token_needs_a_live_lease_of_its_own(server: Running, engine: Engine, case: str) -> None:
    lease = start_turn(engine, "alice")
    token = turn_token(lease)
    if case == "lapsed":  # a crashed replica never released it; the lease simply ran out
        end_turn(engine, lease, lease_until="now() - interval '1 second'")
    elif case == "other-users-conversation":  # bob's token naming alice's conversation and lease
        token = turn_token(lease, user="bob")
    elif case == "other-turn":
        token = turn_token(Lease("alice", lease.conversation_id, uuid.uuid4()))
    else:
        token = turn_token(Lease("alice", uuid.uuid4(), lease.turn_id))
    async with token_client(server.url, token) as client:
        result = await client.call_tool("add_task", {"title": "should not exist"})
    assert error_text(result).endswith("this conversation turn has ended; the request was not carried out")
    assert task_count(engine, "alice") == task_count(engine, "bob") == 0


async def test_operator_token_works_and_expires(server: Running, engine: Engine) -> None:
    token = mint_operator_token(TEST_MCP_SECRET, "carol", ttl_seconds=1)
    async with token_client(server.url, token) as client:
        added = await client.call_tool("add_task", {"title": "by hand"})
        assert added.structured_content == {"task_id": 1, "status": "created", "title": "by hand"}
    await asyncio.sleep(1 + 5 + 1)  # its lifetime plus the verifier's clock-skew leeway
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    response = httpx.post(server.url, json=INITIALIZE, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert task_count(engine, "carol") == 1


def test_old_tool_call_records_are_purged(server: Running, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tool_call (key, user_id, tool, result, created_at) VALUES "
                "('old', 'alice', 'add_task', '{}', now() - interval '3 days'), "
                "('new', 'alice', 'add_task', '{}', now())"
            )
        )
    with Session(engine) as session, session.begin():
        assert purge_tool_calls(session, timedelta(days=2)) == 1
    with engine.connect() as conn:
        assert [row[0] for row in conn.execute(text("SELECT key FROM tool_call"))] == ["new"]


@pytest.mark.parametrize("json_response", [True, False], ids=["json-answers", "sse-answers"])
async def test_the_apis_task_client_calls_tools_however_the_server_answers(
    database_url: str, json_response: bool
) -> None:
    """The API's `TaskServer` sends a call as one JSON-RPC POST and reads the answer itself, whether the
    server answers with JSON (ours) or an event stream; each call runs once."""
    port = free_port()
    settings = make_settings(database_url, mcp_url=f"http://127.0.0.1:{port}/mcp")
    with serve_in_thread(create_mcp_app(settings, json_response=json_response), port=port):
        tasks = TaskServer(settings)
        user = f"client-{uuid.uuid4().hex[:8]}"
        call = TURN_CALL.set(TurnCall(mint_operator_token(TEST_MCP_SECRET, user), request_id="req-1"))
        try:
            assert {tool.name for tool in await tasks.list_tools()} == TOOLS
            added = await tasks.call_tool("add_task", {"title": "Buy milk"})
            assert not added.is_error and added.structured_content == {
                "task_id": 1,
                "status": "created",
                "title": "Buy milk",
            }
            listed = await tasks.call_tool("list_tasks", {"status": "all"})
            assert [task["title"] for task in (listed.structured_content or {})["tasks"]] == ["Buy milk"]
            refused = await tasks.call_tool("complete_task", {"task_id": 0})  # a tool error is an answer
            assert refused.is_error and "positive whole number" in str(refused.content)

            assert (await tasks.call_tool("drop_tables", {})).is_error

            # A refused token is the server failing the turn.
            TURN_CALL.set(TurnCall("not-a-token"))
            with pytest.raises(McpUnavailable):
                await tasks.call_tool("list_tasks", {"status": "all"})
            assert tasks.cached_tools is None  # listed again next time
        finally:
            TURN_CALL.reset(call)
            await tasks.aclose()


async def test_a_streamed_answer_after_notifications_is_read() -> None:
    """An event stream may carry notifications before the answer, with any SSE line ending."""
    notification = '{"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}'
    result = '{"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "ok"}], "isError": false}}'
    body = f"event: message\r\ndata: {notification}\r\n\r\nevent: message\r\ndata: {result}\r\n\r\n"

    async def answer(request: Request) -> Response:
        return Response(body, media_type="text/event-stream")

    port = free_port()
    with serve_in_thread(Starlette(routes=[Route("/mcp", answer, methods=["POST"])]), port=port):
        tasks = TaskServer(make_settings("postgresql://unused/db", mcp_url=f"http://127.0.0.1:{port}/mcp"))
        call = TURN_CALL.set(TurnCall("token"))
        try:
            answered = await tasks.call_tool("list_tasks", {"status": "all"})
        finally:
            TURN_CALL.reset(call)
            await tasks.aclose()
    assert not answered.is_error and answered.content[0].text == "ok"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (200, "application/json", '{"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "boom"}}'),
        (200, "text/event-stream", 'event: message\ndata: {"jsonrpc": "2.0", "method": "notifications/message"}\n\n'),
        (200, "text/html", "<html>a proxy's page</html>"),
        (502, "application/json", '{"error": "bad gateway"}'),
    ],
    ids=["json-rpc-error", "stream-without-answer", "not-json", "status-502"],
)
async def test_a_call_the_server_does_not_answer_fails_the_turn(status: int, content_type: str, body: str) -> None:
    """Anything but a result in the POST's answer is `McpUnavailable` (503 for the turn), never a crash."""

    async def answer(request: Request) -> Response:
        return Response(body, status_code=status, media_type=content_type)

    port = free_port()
    app = Starlette(routes=[Route("/mcp", answer, methods=["POST"])])
    with serve_in_thread(app, port=port):
        tasks = TaskServer(make_settings("postgresql://unused/db", mcp_url=f"http://127.0.0.1:{port}/mcp"))
        call = TURN_CALL.set(TurnCall("token"))
        try:
            with pytest.raises(McpUnavailable):
                await tasks.call_tool("list_tasks", {"status": "all"})
        finally:
            TURN_CALL.reset(call)
            await tasks.aclose()
