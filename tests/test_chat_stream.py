"""POST /api/chat/stream over real HTTP (uvicorn on loopback): events, heartbeats, disconnects, errors."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
from sqlalchemy import Engine, text

from backend.agent.offline import OfflineModel
from backend.config import Settings
from backend.main import create_app
from tests.support import seed
from tests.support.models import Flood, ScriptableOffline
from tests.support.servers import serve_in_thread
from tests.support.stack import with_free_mcp_port
from tests.support.tokens import auth

ALICE, BOB = auth("alice"), auth("bob")


def serve_api(settings: Settings, model: OfflineModel | None = None) -> Any:
    app = create_app(settings, model_factory=(lambda: model) if model else None)
    return serve_in_thread(app)


async def read_events(response: httpx.Response) -> tuple[list[dict[str, Any]], int]:
    """The stream's events, and how many heartbeat events came among them."""
    events, heartbeats = [], 0
    async for line in response.aiter_lines():
        assert not line.startswith(":"), "heartbeats are JSON events, not SSE comments"
        if line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            if event == {"type": "heartbeat"}:
                heartbeats += 1
            else:
                events.append(event)
    return events, heartbeats


async def stream(
    base: str, body: dict[str, Any], headers: dict[str, str] = ALICE
) -> tuple[httpx.Response, list[dict[str, Any]], int]:
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as http,
        http.stream("POST", "/api/chat/stream", json=body, headers=headers) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            return response, [], 0
        events, heartbeats = await read_events(response)
        return response, events, heartbeats


def stored(engine: Engine, conversation_id: str) -> list[dict[str, Any]]:
    return seed.stored_messages(engine, conversation_id, "role, content, status, error_code")


async def test_plain_answer_event_order(stack_settings: Settings) -> None:
    with serve_api(stack_settings) as base:
        response, events, _ = await stream(base, {"message": "hello there"})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"].startswith("no-cache")
    assert response.headers["x-accel-buffering"] == "no"
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "complete"
    assert set(types[1:-1]) == {"token"} and len(types) > 10
    tokens = [e for e in events if e["type"] == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    complete = events[-1]
    assert complete["full_content"] == "".join(t["token"] for t in tokens)
    assert complete["message_id"] == events[0]["message_id"]
    assert complete["usage"]["total_tokens"] > 0 and complete["duration_ms"] >= 0
    assert complete["tool_calls"] == []


async def test_tool_answer_event_order_and_storage(stack_settings: Settings, engine: Engine) -> None:
    with serve_api(stack_settings) as base:
        _, events, _ = await stream(base, {"message": "add buy milk"})
        types = [e["type"] for e in events]
        assert types[:3] == ["start", "tool_call", "tool_result"]
        assert types[-1] == "complete" and set(types[3:-1]) == {"token"}
        call, result = events[1], events[2]
        assert call["name"] == "add_task" and call["arguments"] == {"title": "buy milk"}
        assert result["call_id"] == call["call_id"]
        assert result["result"] == {"task_id": 1, "status": "created", "title": "buy milk"}
        complete = events[-1]
        assert complete["tool_calls"] == [
            {"name": "add_task", "arguments": {"title": "buy milk"}, "result": result["result"]}
        ]
        cid = events[0]["conversation_id"]
        async with httpx.AsyncClient(base_url=base) as http:
            detail = (await http.get(f"/api/conversations/{cid}", headers=ALICE)).json()
    assert [m["status"] for m in detail["messages"]] == ["complete", "complete"]
    assert detail["messages"][1]["content"] == complete["full_content"]
    assert detail["messages"][1]["tool_calls"] == complete["tool_calls"]


async def test_tokens_leave_before_the_answer_is_finished(stack_settings: Settings, engine: Engine) -> None:
    model = ScriptableOffline(stall_after=3)
    with serve_api(stack_settings, model) as base:
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("POST", "/api/chat/stream", json={"message": "hello"}, headers=ALICE) as response,
        ):
            seen: list[dict[str, Any]] = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if len([e for e in seen if e["type"] == "token"]) == 3:
                        break  # the model is now stalled: these tokens were not held back
        # The client went away mid-answer: the partial answer is stored as aborted.
        cid = seen[0]["conversation_id"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(stored(engine, cid)) < 2:
            await asyncio.sleep(0.05)
        user, assistant = stored(engine, cid)
        assert user["content"] == "hello"
        assert assistant["status"] == "aborted"
        assert assistant["content"] == "".join(e["token"] for e in seen if e["type"] == "token")
        # ... and the conversation is free again.
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            model.stall_after = None
            again = await http.post("/api/chat", json={"message": "hello", "conversation_id": cid}, headers=ALICE)
        assert again.status_code == 200


async def test_failure_mid_stream_ends_with_an_error_event(stack_settings: Settings, engine: Engine) -> None:
    with serve_api(stack_settings, ScriptableOffline(fail_after=2)) as base:
        _, events, _ = await stream(base, {"message": "hello"})
    assert [e["type"] for e in events] == ["start", "token", "token", "error"]
    error = events[-1]
    assert error == {"type": "error", "code": "model_error", "message": error["message"], "retryable": True}
    assert "SECRET" not in json.dumps(events)
    _user, assistant = stored(engine, events[0]["conversation_id"])
    assert assistant["status"] == "error" and assistant["error_code"] == "model_error"
    assert assistant["content"] == events[1]["token"] + events[2]["token"]


async def test_heartbeats_while_the_model_is_silent(stack_settings: Settings) -> None:
    settings = stack_settings.model_copy(update={"sse_heartbeat_seconds": 0.05})
    with serve_api(settings, ScriptableOffline(pause=0.4)) as base:
        _, events, heartbeats = await stream(base, {"message": "hello"})
    assert heartbeats >= 3
    assert events[-1]["type"] == "complete"


async def test_mcp_down_streams_an_error_event(settings: Settings, engine: Engine) -> None:
    settings = with_free_mcp_port(settings)
    with serve_api(settings) as base:
        _, events, _ = await stream(base, {"message": "add buy milk"})
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[-1]["code"] == "mcp_unavailable" and events[-1]["retryable"] is True
    assert [m["status"] for m in stored(engine, events[0]["conversation_id"])] == ["complete", "error"]


async def test_errors_before_the_stream_are_http_statuses(stack_settings: Settings) -> None:
    model = ScriptableOffline()
    with serve_api(stack_settings, model) as base:
        _, events, _ = await stream(base, {"message": "add buy milk"})
        cid = events[0]["conversation_id"]
        theirs, _, _ = await stream(base, {"message": "hi", "conversation_id": cid}, headers=BOB)
        assert theirs.status_code == 404 and theirs.json()["code"] == "not_found"
        unauthenticated, _, _ = await stream(base, {"message": "hi"}, headers={})
        assert unauthenticated.status_code == 401
        invalid, _, _ = await stream(base, {"message": ""})
        assert invalid.status_code == 422
        # While a turn runs on the conversation, another one is refused at once.
        model.stall_after = 1
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream(
                "POST", "/api/chat/stream", json={"message": "x", "conversation_id": cid}, headers=ALICE
            ) as held,
        ):
            async for line in held.aiter_lines():
                if '"token"' in line:
                    break
            busy, _, _ = await stream(base, {"message": "interleave", "conversation_id": cid})
            assert busy.status_code == 409 and busy.json()["code"] == "conversation_busy"


async def test_a_client_that_stops_reading_is_let_go(stack_settings: Settings, engine: Engine) -> None:
    """No unbounded buffer for a client that does not read: the stream is ended after the send timeout,
    its run cancelled and stored as aborted, and the conversation freed."""
    settings = stack_settings.model_copy(update={"sse_send_timeout_seconds": 1.0})
    with serve_api(settings, Flood()) as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"message": "hello"}).encode()
        request = (
            f"POST /api/chat/stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: {ALICE['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(request)  # ... and read nothing
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    rows = conn.execute(text("SELECT status FROM message WHERE role = 'assistant'")).all()
                if rows:
                    break
                await asyncio.sleep(0.1)
            assert [row.status for row in rows] == ["aborted"]
            with engine.connect() as conn:
                leases = conn.execute(text("SELECT turn_id FROM conversation")).all()
            assert [row.turn_id for row in leases] == [None]
            # The server closed the connection: what it had sent drains, then EOF.
            sock.settimeout(10)
            while chunk := sock.recv(1 << 20):
                assert chunk
