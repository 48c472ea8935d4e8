"""The real model path for OpenAI-compatible providers: CHAT_MODEL=openai/<name> through LiteLLM to a
local stub of the chat-completions API (tests/support/openai_stub.py). Nothing is faked between the
API and the stub. LiteLLM sends these requests with its own HTTP handler, not the OpenAI SDK
(see agent/factory._prepare_litellm), so the tests also pin down that it speaks the protocol fully.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy import Engine

from backend.config import Settings
from tests.support.gemini_stub import SECRET_MARKER
from tests.support.openai_stub import OpenAIStub
from tests.support.seed import stored_messages
from tests.support.stack import api_client, mcp_server, with_free_mcp_port
from tests.support.tokens import auth

ALICE = auth("alice")
KEY = "sk-test-key"
TOOLS = {"add_task", "list_tasks", "complete_task", "update_task", "delete_task"}


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAIStub]:
    with OpenAIStub(expected_api_key=KEY) as server:
        yield server


@pytest.fixture
def stub(openai_server: OpenAIStub) -> OpenAIStub:
    openai_server.reset()
    return openai_server


@pytest.fixture
def openai_settings(settings: Settings, stub: OpenAIStub) -> Iterator[Settings]:
    settings = with_free_mcp_port(settings).model_copy(
        update={
            "chat_model": "openai/stub-model",
            "model_api_key": KEY,
            "model_api_base": stub.base_url,
            "model_max_retries": 1,
            "model_timeout_seconds": 1.0,
        }
    )
    with mcp_server(settings):
        yield settings


@pytest.fixture
async def http(openai_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(openai_settings) as client:
        yield client


async def test_tool_call_then_text(http: httpx.AsyncClient, stub: OpenAIStub) -> None:
    stub.reply_function_call("add_task", {"title": "Buy milk"}, input_tokens=50, output_tokens=7)
    stub.reply_text("Added task 1: Buy milk.", input_tokens=80, output_tokens=9)
    response = await http.post("/api/chat", json={"message": "please add buy milk"}, headers=ALICE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response"] == "Added task 1: Buy milk."
    assert body["model"] == "openai/stub-model"
    assert body["tool_calls"] == [
        {
            "name": "add_task",
            "arguments": {"title": "Buy milk"},
            "result": {"task_id": 1, "status": "created", "title": "Buy milk"},
        }
    ]
    assert body["usage"] == {"input_tokens": 130, "output_tokens": 16, "total_tokens": 146}

    first, second = stub.requests
    assert first.body["model"] == "stub-model" and not first.stream
    assert {tool["function"]["name"] for tool in first.body["tools"]} == TOOLS
    assert "user_id" not in json.dumps(first.body["tools"])
    assert first.body["messages"][0]["role"] == "system" and "todo list" in first.body["messages"][0]["content"]
    # The tool's result went back as a `tool` message answering the call's id.
    (call,) = second.body["messages"][-2]["tool_calls"]
    result = second.body["messages"][-1]
    assert result["role"] == "tool" and result["tool_call_id"] == call["id"] and "Buy milk" in result["content"]
    # LiteLLM's own HTTP client, not the OpenAI SDK's (whose per-call request transform is the cost).
    assert not first.headers.get("user-agent", "").startswith(("OpenAI/", "AsyncOpenAI/"))
    assert not any(name.startswith("x-stainless") for name in first.headers)


async def test_second_turn_sends_the_first_as_history(http: httpx.AsyncClient, stub: OpenAIStub) -> None:
    stub.reply_text("Hello Alice!")
    stub.reply_text("You said hello.")
    cid = (await http.post("/api/chat", json={"message": "hello"}, headers=ALICE)).json()["conversation_id"]
    second = await http.post("/api/chat", json={"message": "what did I say?", "conversation_id": cid}, headers=ALICE)
    assert second.json()["response"] == "You said hello."
    messages = stub.requests[-1].body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "Hello Alice!"


async def test_streamed_turn(http: httpx.AsyncClient, stub: OpenAIStub) -> None:
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
    assert all(request.body["stream_options"] == {"include_usage": True} for request in stub.requests)


async def test_transient_error_is_retried(http: httpx.AsyncClient, stub: OpenAIStub) -> None:
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
    http: httpx.AsyncClient, stub: OpenAIStub, engine: Engine, status: int, code: str, retryable: bool
) -> None:
    for _ in range(3):  # more than the retries
        stub.reply_error(status)
    response = await http.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    assert response.status_code == 502
    body = response.json()
    assert (body["code"], body["retryable"]) == (code, retryable)
    assert SECRET_MARKER not in response.text
    assert _stored(engine, body["conversation_id"]) == [("user", "complete", None), ("assistant", "error", code)]


async def test_bad_key_is_an_auth_failure(openai_settings: Settings) -> None:
    settings = openai_settings.model_copy(update={"model_api_key": "sk-wrong-key"})
    async with api_client(settings) as client:
        response = await client.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    assert response.status_code == 502
    assert response.json()["code"] == "model_auth_failed"
    assert "sk-wrong-key" not in response.text


async def test_model_timeout_is_504(http: httpx.AsyncClient, stub: OpenAIStub, engine: Engine) -> None:
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


async def test_provider_unreachable_is_502(openai_settings: Settings) -> None:
    settings = openai_settings.model_copy(update={"model_api_base": "http://127.0.0.1:9/v1"})
    async with api_client(settings) as client:
        response = await client.post("/api/chat", json={"message": "hi"}, headers=ALICE)
    assert response.status_code == 502
    assert response.json()["code"] == "model_unavailable"


def _stored(engine: Engine, conversation_id: str) -> list[tuple[str, str, str | None]]:
    rows = stored_messages(engine, conversation_id, "role, status, error_code")
    return [(row["role"], row["status"], row["error_code"]) for row in rows]
