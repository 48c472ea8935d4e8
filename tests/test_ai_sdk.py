"""POST /api/chat/ui over real HTTP: the Vercel AI SDK's UI message stream, read by the real `ai` package
(tests/js/ai, the chat logic useChat runs with the stock DefaultChatTransport) and by hand."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.api.ui_stream import conversation_id
from backend.config import Settings
from backend.main import create_app
from tests.support.models import ScriptableOffline
from tests.support.node import npm_project, run_node
from tests.support.servers import serve_in_thread
from tests.support.tokens import auth, user_token

ALICE, BOB = auth("alice"), auth("bob")


@pytest.fixture(scope="session")
def ai_sdk() -> Path:
    return npm_project("ai")


@pytest.fixture
def api(stack_settings: Settings) -> Iterator[str]:
    """The API on a loopback port, the offline model (which calls task tools) slow enough to start
    that heartbeats go out before it answers."""
    settings = stack_settings.model_copy(update={"sse_heartbeat_seconds": 0.05})
    model = ScriptableOffline(pause=0.3)
    with serve_in_thread(create_app(settings, model_factory=lambda: model)) as base:
        yield base


def ui_message(text: str, message_id: str | None = None) -> dict[str, Any]:
    return {"id": message_id or uuid.uuid4().hex[:16], "role": "user", "parts": [{"type": "text", "text": text}]}


def post_ui(base: str, body: dict[str, Any], headers: dict[str, str] = ALICE) -> tuple[httpx.Response, list[str]]:
    """The response and its body's SSE lines (blank lines dropped)."""
    with (
        httpx.Client(base_url=base, timeout=30) as http,
        http.stream("POST", "/api/chat/ui", json=body, headers=headers) as response,
    ):
        lines = [line for line in response.iter_lines() if line]
    return response, lines


def parts(lines: list[str]) -> list[dict[str, Any]]:
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1] if line.startswith("data: ")]


def conversation(base: str, cid: str, headers: dict[str, str] = ALICE) -> dict[str, Any]:
    response = httpx.get(f"{base}/api/conversations/{cid}", headers=headers)
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    return detail


# --- the real client --------------------------------------------------------------------------------------


def test_ai_sdk_chat(api: str, ai_sdk: Path) -> None:
    chat_id = "k3JbV7qAz9Xw2LmP"  # the shape of the AI SDK's own generated ids
    out: Any = run_node(ai_sdk, "chat.mjs", api, user_token("alice"), chat_id)
    cid = str(conversation_id(chat_id, "alice"))

    first = out["first"]
    assert first["status"] == "ready" and first["errors"] == [], first
    user, answer = first["messages"]
    assert user["role"] == "user" and answer["role"] == "assistant"
    (tool,) = [p for p in answer["parts"] if p["type"] == "dynamic-tool"]
    assert tool["toolName"] == "add_task" and tool["state"] == "output-available"
    assert tool["input"] == {"title": "buy milk"}
    assert tool["output"] == {"task_id": 1, "status": "created", "title": "buy milk"}
    text = "".join(p["text"] for p in answer["parts"] if p["type"] == "text")
    assert "buy milk" in text
    assert all(p["state"] == "done" for p in answer["parts"] if p["type"] == "text")
    assert answer["metadata"]["conversationId"] == cid
    assert answer["metadata"]["usage"]["total_tokens"] > 0

    # The second message continues the same conversation, whose history the server keeps.
    second = out["second"]
    assert second["status"] == "ready" and second["errors"] == [], second
    listed = second["messages"][3]
    assert listed["metadata"]["conversationId"] == cid
    (list_tool,) = [p for p in listed["parts"] if p["type"] == "dynamic-tool"]
    assert list_tool["toolName"] == "list_tasks"
    assert [t["title"] for t in list_tool["output"]["tasks"]] == ["buy milk"]

    # Regenerate: the client's last answer is replaced by a new one, and so is the stored one.
    regenerated = out["regenerated"]
    assert regenerated["status"] == "ready" and regenerated["errors"] == [], regenerated
    messages = regenerated["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["id"] != out["regenerated"]["replaced"]
    assert messages[2]["id"] == second["messages"][2]["id"]

    stored = conversation(api, cid)["messages"]
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    # The user messages are stored once each, under the ids the client gave them.
    assert [m["client_message_id"] for m in stored if m["role"] == "user"] == [user["id"], messages[2]["id"]]
    assert str(stored[3]["id"]) == messages[3]["id"] != listed["id"]
    assert stored[1]["tool_calls"][0]["name"] == "add_task"

    # No token: the transport reports the 401 as the chat's error; nothing was stored.
    refused = out["unauthorized"]
    assert refused["status"] == "error"
    (error,) = refused["errors"]
    assert json.loads(error)["code"] == "unauthorized"
    assert [m["role"] for m in refused["messages"]] == ["user"]


# --- the protocol on the wire -----------------------------------------------------------------------------


def test_stream_shape_headers_and_heartbeats(api: str) -> None:
    response, lines = post_ui(
        api, {"id": "wire", "messages": [ui_message("add read a book")], "trigger": "submit-message"}
    )
    assert response.status_code == 200
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["content-type"].startswith("text/event-stream")
    # Heartbeats are comments here: the AI SDK's schema refuses unknown part types.
    assert ": heartbeat" in lines
    assert all(line.startswith(("data: ", ": heartbeat")) for line in lines)
    chunks = parts(lines)
    types = [c["type"] for c in chunks]
    assert types[:3] == ["start", "tool-input-available", "tool-output-available"]
    assert types[3] == "text-start" and types[-2:] == ["text-end", "finish"]
    assert set(types[4:-2]) == {"text-delta"}
    start, call, result = chunks[:3]
    assert call["dynamic"] is True and call["providerExecuted"] is True
    assert call["toolName"] == "add_task" and call["input"] == {"title": "read a book"}
    assert result["toolCallId"] == call["toolCallId"] and result["output"]["status"] == "created"
    text_ids = {c["id"] for c in chunks if c["type"].startswith("text-")}
    assert len(text_ids) == 1
    cid = start["messageMetadata"]["conversationId"]
    assert cid == str(conversation_id("wire", "alice"))
    stored = conversation(api, cid)["messages"]
    assert stored[1]["id"] == start["messageId"]
    assert stored[1]["content"] == "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


def test_repeated_message_id_replays_the_stored_answer(api: str) -> None:
    body = {"id": "again", "messages": [ui_message("add water plants", "same-user-message")]}
    _, first = post_ui(api, body)
    _, second = post_ui(api, body)
    one, two = parts(first), parts(second)
    assert one[0]["messageId"] == two[0]["messageId"]
    text = "".join(c["delta"] for c in one if c["type"] == "text-delta")
    assert text and text == "".join(c["delta"] for c in two if c["type"] == "text-delta")
    replayed = [c for c in two if c["type"].startswith("tool-")]
    assert [c["type"] for c in replayed] == ["tool-input-available", "tool-output-available"]
    assert replayed[1]["output"] == next(c for c in one if c["type"] == "tool-output-available")["output"]
    stored = conversation(api, one[0]["messageMetadata"]["conversationId"])["messages"]
    assert len(stored) == 2  # one turn, one task
    listed = httpx.post(f"{api}/api/chat", json={"message": "show my tasks"}, headers=ALICE).json()
    assert [t["title"] for t in listed["tool_calls"][0]["result"]["tasks"]] == ["water plants"]


def test_uuid_chat_id_is_the_conversation(api: str) -> None:
    started = httpx.post(f"{api}/api/chat", json={"message": "hello"}, headers=ALICE, timeout=30).json()
    cid = started["conversation_id"]
    _, lines = post_ui(api, {"id": cid, "messages": [ui_message("hi again")]})
    assert parts(lines)[0]["messageMetadata"]["conversationId"] == cid
    assert len(conversation(api, cid)["messages"]) == 4
    # Someone else's conversation id answers like a missing one, and nothing is created or stored.
    response, _ = post_ui(api, {"id": cid, "messages": [ui_message("mine now")]}, headers=BOB)
    assert response.status_code == 404
    assert httpx.get(f"{api}/api/conversations", headers=BOB).json()["data"] == []
    assert len(conversation(api, cid)["messages"]) == 4


def test_the_same_chat_id_is_another_conversation_for_another_user(api: str) -> None:
    _, mine = post_ui(api, {"id": "shared-name", "messages": [ui_message("hello")]})
    _, theirs = post_ui(api, {"id": "shared-name", "messages": [ui_message("hello")]}, headers=BOB)
    assert parts(mine)[0]["messageMetadata"]["conversationId"] != parts(theirs)[0]["messageMetadata"]["conversationId"]


def test_a_long_chat_fits_where_a_chat_message_would_not(api: str) -> None:
    """The transport resends the whole chat each time: /api/chat/ui has its own, larger body limit
    (MAX_UI_BODY_BYTES); only the newest message is read. The other routes keep MAX_BODY_BYTES."""
    earlier = [
        ui_message("x" * 7_000)
        if i % 2 == 0
        else {"id": f"a{i}", "role": "assistant", "parts": [{"type": "text", "text": "y" * 7_000}]}
        for i in range(29)
    ]
    body = {"id": "long-chat", "messages": [*earlier, ui_message("hello")]}
    assert len(json.dumps(body)) > 200_000
    response, lines = post_ui(api, body)
    assert response.status_code == 200 and parts(lines)[-1]["type"] == "finish"
    stored = conversation(api, parts(lines)[0]["messageMetadata"]["conversationId"])["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["hello"]
    too_big = httpx.post(f"{api}/api/chat", json={"message": "hello", "padding": "x" * 200_000}, headers=ALICE)
    assert (too_big.status_code, too_big.json()["code"]) == (413, "payload_too_large")
    way_too_big = httpx.post(f"{api}/api/chat/ui", content=b"x" * 1_100_000, headers=ALICE)
    assert (way_too_big.status_code, way_too_big.json()["code"]) == (413, "payload_too_large")


def test_refusals_before_the_stream(api: str) -> None:
    history = [ui_message("add x"), {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "ok"}]}]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"id": "r", "messages": history}, 422, "validation_error"),
        ({"id": "r", "messages": [ui_message("   ")]}, 422, "validation_error"),
        ({"id": "r", "messages": []}, 422, "validation_error"),
        ({"id": "r", "messages": [ui_message("x")], "trigger": "resume-stream"}, 422, "validation_error"),
        (
            {
                "id": "r",
                "messages": [
                    {"id": "f", "role": "user", "parts": [{"type": "file", "mediaType": "image/png", "url": "data:,"}]}
                ],
            },
            400,
            "attachments_not_supported",
        ),
    ]
    for body, status, code in cases:
        response = httpx.post(f"{api}/api/chat/ui", json=body, headers=ALICE)
        assert (response.status_code, response.json()["code"]) == (status, code), (body, response.text)
    response = httpx.post(f"{api}/api/chat/ui", json={"id": "r", "messages": [ui_message("x")]})
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{api}/api/conversations", headers=ALICE).json()["data"] == []


def test_a_failure_during_the_stream_is_an_error_part(stack_settings: Settings) -> None:
    model = ScriptableOffline(fail_after=2)
    with serve_in_thread(create_app(stack_settings, model_factory=lambda: model)) as base:
        response, lines = post_ui(base, {"id": "boom", "messages": [ui_message("hello there")]})
        assert response.status_code == 200
        chunks = parts(lines)
        types = [c["type"] for c in chunks]
        assert types == ["start", "text-start", "text-delta", "text-delta", "text-end", "error"]
        error = chunks[-1]
        assert error["code"] == "model_error" and error["retryable"] is True
        assert "SECRET" not in error["errorText"] and error["errorText"]
        stored = conversation(base, chunks[0]["messageMetadata"]["conversationId"])["messages"]
        assert stored[1]["status"] == "error"
