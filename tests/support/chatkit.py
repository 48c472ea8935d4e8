"""The ChatKit protocol as a test client speaks it: request bodies, SSE parsing, stored rows."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy import Engine, text

from tests.support import seed
from tests.support.tokens import auth

ALICE, BOB = auth("alice"), auth("bob")
NOT_FOUND = {"detail": "Conversation not found", "code": "not_found"}


def error_body(response: httpx.Response) -> dict[str, Any]:
    """An error body without its `request_id` (checked: the response's X-Request-ID), for comparing."""
    body: dict[str, Any] = response.json()
    assert body.pop("request_id") == response.headers["x-request-id"]
    return body


def user_input(message: str, attachments: list[str] | None = None) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": message}],
        "attachments": attachments or [],
        "inference_options": {},
    }


def create(message: str, **input_extra: Any) -> dict[str, Any]:
    return {"type": "threads.create", "params": {"input": {**user_input(message), **input_extra}}}


def add(thread_id: str, message: str) -> dict[str, Any]:
    return {"type": "threads.add_user_message", "params": {"thread_id": thread_id, "input": user_input(message)}}


def parse_events(body: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def post(http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] = ALICE) -> httpx.Response:
    return await http.post("/chatkit", json=body, headers=headers)


async def stream(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] = ALICE
) -> list[dict[str, Any]]:
    response = await post(http, body, headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_events(response.text)


async def call(http: httpx.AsyncClient, kind: str, headers: dict[str, str] = ALICE, **params: Any) -> Any:
    response = await post(http, {"type": kind, "params": params}, headers)
    assert response.status_code == 200, response.text
    return response.json()


def thread_id_of(events: list[dict[str, Any]]) -> str:
    assert events[0]["type"] == "thread.created"
    return str(events[0]["thread"]["id"])


def answer_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message item as finally streamed."""
    (done,) = [e for e in events if e["type"] == "thread.item.done" and e["item"]["type"] == "assistant_message"]
    return dict(done["item"])


def deltas(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["update"]["delta"]
        for e in events
        if e["type"] == "thread.item.updated" and e["update"]["type"] == "assistant_message.content_part.text_delta"
    ]


def stored(engine: Engine, conversation_id: str) -> list[dict[str, Any]]:
    rows = seed.stored_messages(engine, conversation_id, "id, role, content, status, error_code, tool_calls")
    return [{**row, "id": str(row["id"])} for row in rows]


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
