"""The real model path: CHAT_MODEL=gemini/... through LiteLLM to a local stub speaking Gemini's REST API.

Nothing is faked between the API and the stub: the agent, LitellmModel, LiteLLM's Gemini adapter,
the MCP server and PostgreSQL are all real.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy import Engine

from backend.config import Settings
from tests.conftest import GEMINI_TEST_KEY
from tests.support.gemini_stub import SECRET_MARKER, GeminiStub
from tests.support.seed import stored_messages
from tests.support.stack import api_client, mcp_server, with_free_mcp_port
from tests.support.tokens import auth

ALICE = auth("alice")


@pytest.fixture
def gemini_settings(settings: Settings, stub: GeminiStub) -> Iterator[Settings]:
    settings = with_free_mcp_port(settings).model_copy(
        update={
            "chat_model": "gemini/gemini-2.5-flash",
            "gemini_api_key": GEMINI_TEST_KEY,
            "model_api_base": stub.base_url,
            "model_max_retries": 1,
            "model_timeout_seconds": 1.0,
        }
    )
    with mcp_server(settings):
        yield settings


@pytest.fixture
async def http(gemini_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gemini_settings) as client:
        yield client


async def test_function_call_then_text(http: httpx.AsyncClient, stub: GeminiStub, engine: Engine) -> None:
    stub.reply_function_call("add_task", {"title": "Buy milk"}, input_tokens=50, output_tokens=7)
    stub.reply_text("Added task 1: Buy milk.", input_tokens=80, output_tokens=9)
    response = await http.post("/api/chat", json={"message": "please add buy milk"}, headers=ALICE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response"] == "Added task 1: Buy milk."
    assert body["model"] == "gemini/gemini-2.5-flash"
    assert body["tool_calls"] == [
        {
            "name": "add_task",
            "arguments": {"title": "Buy milk"},
            "result": {"task_id": 1, "status": "created", "title": "Buy milk"},
        }
    ]
    assert body["usage"] == {"input_tokens": 130, "output_tokens": 16, "total_tokens": 146}

    first, second = stub.requests
    assert first.api_key == GEMINI_TEST_KEY
    assert {d["name"] for d in first.function_declarations} == {
        "add_task",
        "list_tasks",
        "complete_task",
        "update_task",
        "delete_task",
    }
    assert "user_id" not in str(first.function_declarations)
    assert "todo list" in first.system_text
    # The tool's result went back to Gemini as a function response.
    responses = [p for p in second.parts if "function_response" in p or "functionResponse" in p]
    assert responses and "Buy milk" in str(responses[0])


async def test_second_turn_sends_the_first_as_history(http: httpx.AsyncClient, stub: GeminiStub) -> None:
    stub.reply_text("Hello Alice!")
    stub.reply_text("You said hello.")
    cid = (await http.post("/api/chat", json={"message": "hello"}, headers=ALICE)).json()["conversation_id"]
    second = await http.post("/api/chat", json={"message": "what did I say?", "conversation_id": cid}, headers=ALICE)
    assert second.json()["response"] == "You said hello."
    request = stub.requests[-1]
    assert request.roles == ["user", "model", "user"]
    assert "hello" in str(request.contents[0]) and "Hello Alice!" in str(request.contents[1])


async def test_transient_error_is_retried_by_the_sdk(http: httpx.AsyncClient, stub: GeminiStub) -> None:
    stub.reply_error(503)
    stub.reply_text("recovered")
    response = await http.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    assert response.status_code == 200
    assert response.json()["response"] == "recovered"
    assert len(stub.requests) == 2


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [(429, "model_rate_limited", True), (500, "model_error", True), (400, "model_error", False)],
)
async def test_provider_errors_are_mapped_and_the_message_kept(
    http: httpx.AsyncClient, stub: GeminiStub, engine: Engine, status: int, code: str, retryable: bool
) -> None:
    for _ in range(3):  # more than the retries
        stub.reply_error(status)
    response = await http.post("/api/chat", json={"message": "hi", "client_message_id": "k1"}, headers=ALICE)
    assert response.status_code == 502
    body = response.json()
    assert (body["code"], body["retryable"]) == (code, retryable)
    assert SECRET_MARKER not in response.text
    assert _stored(engine, body["conversation_id"]) == [("user", "complete", None), ("assistant", "error", code)]

    # The same client_message_id re-runs the turn once the provider is back, without a second user message.
    stub.reset()
    stub.reply_text("now it works")
    retry = await http.post(
        "/api/chat",
        json={"message": "hi", "client_message_id": "k1", "conversation_id": body["conversation_id"]},
        headers=ALICE,
    )
    assert retry.status_code == 200
    assert [row[0] for row in _stored(engine, body["conversation_id"])] == ["user", "assistant", "assistant"]


async def test_bad_key_is_an_auth_failure(http: httpx.AsyncClient, gemini_settings: Settings) -> None:
    settings = gemini_settings.model_copy(update={"gemini_api_key": "wrong-key"})
    async with api_client(settings) as client:
        response = await client.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    assert response.status_code == 502
    assert response.json()["code"] == "model_auth_failed"
    assert "wrong-key" not in response.text


async def test_model_timeout_is_504(http: httpx.AsyncClient, stub: GeminiStub, engine: Engine) -> None:
    stub.reply_delay(3)
    stub.reply_delay(3)
    response = await http.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    assert response.status_code == 504
    body = response.json()
    assert body["code"] == "model_timeout" and body["retryable"] is True
    assert _stored(engine, body["conversation_id"]) == [
        ("user", "complete", None),
        ("assistant", "error", "model_timeout"),
    ]


async def test_provider_unreachable_is_502(gemini_settings: Settings) -> None:
    settings = gemini_settings.model_copy(update={"model_api_base": "http://127.0.0.1:9/v1beta"})
    async with api_client(settings) as client:
        response = await client.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    assert response.status_code == 502
    assert response.json()["code"] == "model_unavailable"


async def test_streamed_turn_through_litellm(http: httpx.AsyncClient, stub: GeminiStub) -> None:
    stub.reply_function_call("list_tasks", {"status": "all"}, input_tokens=40, output_tokens=5)
    stub.reply_text("You have no tasks yet.", input_tokens=60, output_tokens=6)
    response = await http.post("/api/chat/stream", json={"message": "what's on my list?"}, headers=ALICE)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    types = [e["type"] for e in events]
    assert types[:3] == ["start", "tool_call", "tool_result"] and types[-1] == "complete"
    tokens = [e["token"] for e in events if e["type"] == "token"]
    assert len(tokens) > 1 and "".join(tokens) == "You have no tasks yet."
    assert events[-1]["usage"] == {"input_tokens": 100, "output_tokens": 11, "total_tokens": 111}
    assert all(request.stream for request in stub.requests)


async def test_a_provider_failure_is_one_log_line_with_its_cause(
    http: httpx.AsyncClient, stub: GeminiStub, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        stub.reply_error(403)
    with caplog.at_level(logging.INFO):
        response = await http.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    body = response.json()
    assert (response.status_code, body["code"], body["retryable"]) == (502, "model_auth_failed", False)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("turn failed")]
    host = stub.base_url.removeprefix("http://").split("/")[0]
    assert "status=403" in line and f"host={host}" in line and "provider=gemini" in line
    printed = capfd.readouterr()
    everything = caplog.text + printed.out + printed.err
    assert SECRET_MARKER not in everything  # the provider's body is not logged
    assert "Give Feedback" not in everything and "\x1b[" not in everything  # no LiteLLM banners


def test_start_up_warm_up_never_fetches_litellms_cost_map() -> None:
    """LiteLLM downloads its model cost map at import unless told not to; a container has no network,
    so that is a DNS timeout at start-up. The warm-up must set the switch before anything imports it,
    even when the environment (unlike the image's and the tests') does not."""
    script = """
import asyncio, sys
lookups = []
sys.addaudithook(lambda event, args: lookups.append(args[0]) if event == "socket.getaddrinfo" else None)
from backend.agent.factory import warm_up
from backend.config import Settings
asyncio.run(warm_up(Settings(chat_model="openai/warm", model_api_key="x", _env_file=None)))
assert "litellm" in sys.modules
print("lookups:", sorted({str(host) for host in lookups}))
"""
    env = {name: value for name, value in os.environ.items() if name != "LITELLM_LOCAL_MODEL_COST_MAP"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lookups: []" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "cost map" not in result.stderr


def _stored(engine: Engine, conversation_id: str) -> list[tuple[str, str, str | None]]:
    rows = stored_messages(engine, conversation_id, "role, status, error_code")
    return [(row["role"], row["status"], row["error_code"]) for row in rows]
