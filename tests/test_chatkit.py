"""POST /chatkit: the ChatKit protocol over the conversation and message tables, driven by plain HTTP.

A ChatKit thread is a conversation and its items are the messages; answers come from the same turn
service as /api/chat (real MCP server, real PostgreSQL; the offline model, a scripted model, or the
real LiteLLM Gemini adapter against a local stub).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import litellm
import pytest
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message
from chatkit.types import ClientToolCallItem, ThreadItem
from fastapi import FastAPI
from pydantic import TypeAdapter
from sqlalchemy import Engine

from backend.config import Settings
from backend.main import create_app
from tests.conftest import GEMINI_TEST_KEY
from tests.support.chatkit import (
    ALICE,
    BOB,
    NOT_FOUND,
    add,
    answer_of,
    call,
    count,
    create,
    deltas,
    error_body,
    parse_events,
    post,
    stored,
    stream,
    thread_id_of,
    user_input,
)
from tests.support.gemini_stub import SECRET_MARKER, GeminiStub
from tests.support.models import ScriptableOffline
from tests.support.servers import serve_in_thread
from tests.support.stack import api_client

# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
async def http(stack_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack_settings) as client:
        yield client


# --- answers: the same turn as /api/chat, as ChatKit events ----------------------------------------


async def test_plain_answer_streams_as_an_assistant_message(http: httpx.AsyncClient, engine: Engine) -> None:
    response = await post(http, create("hello there"))
    assert response.headers["cache-control"].startswith("no-cache")
    assert response.headers["x-accel-buffering"] == "no"
    events = parse_events(response.text)
    types = [e["type"] for e in events]
    assert types[:3] == ["thread.created", "thread.item.done", "stream_options"]
    tid = thread_id_of(events)
    user_item = events[1]["item"]
    assert user_item["type"] == "user_message" and user_item["content"][0]["text"] == "hello there"

    answer = answer_of(events)
    added = [e for e in events if e["type"] == "thread.item.added"]
    assert [e["item"]["id"] for e in added] == [answer["id"]]
    assert types.index("thread.item.added") < types.index("thread.item.updated")
    assert types[-1] == "thread.item.done"
    assert len(deltas(events)) > 5
    assert "".join(deltas(events)) == answer["content"][0]["text"]
    assert "offline model" in answer["content"][0]["text"]
    # Every update belongs to the stored assistant message; no placeholder ids anywhere.
    updated_ids = {e["item_id"] for e in events if e["type"] == "thread.item.updated"}
    assert updated_ids == {answer["id"]}
    assert "__fake_id__" not in response.text
    # The new thread is titled from its first message, like a conversation made by /api/chat.
    (updated,) = [e for e in events if e["type"] == "thread.updated"]
    assert updated["thread"]["title"] == "hello there"

    # Stored exactly once each, under the ids the stream used.
    user, assistant = stored(engine, tid)
    assert (user["id"], user["role"], user["content"]) == (user_item["id"], "user", "hello there")
    assert (assistant["id"], assistant["status"]) == (answer["id"], "complete")
    assert assistant["content"] == answer["content"][0]["text"]

    # ... and readable over ChatKit and REST alike.
    thread = await call(http, "threads.get_by_id", thread_id=tid)
    assert thread["title"] == "hello there"
    assert [(i["id"], i["type"]) for i in thread["items"]["data"]] == [
        (user_item["id"], "user_message"),
        (answer["id"], "assistant_message"),
    ]
    listing = (await http.get("/api/conversations", headers=ALICE)).json()["data"]
    assert [(c["id"], c["title"], c["message_count"]) for c in listing] == [(tid, "hello there", 2)]
    detail = (await http.get(f"/api/conversations/{tid}", headers=ALICE)).json()
    assert [m["id"] for m in detail["messages"]] == [user_item["id"], answer["id"]]


async def test_tool_answer_shows_progress_and_stores_the_call(http: httpx.AsyncClient, engine: Engine) -> None:
    events = await stream(http, create("add buy milk"))
    types = [e["type"] for e in events]
    progress = [e for e in events if e["type"] == "progress_update"]
    assert [p["text"] for p in progress] == ["Adding a task"]
    assert types.index("progress_update") < types.index("thread.item.added")
    answer = answer_of(events)["content"][0]["text"]
    assert answer.startswith("Added task 1")
    _, assistant = stored(engine, thread_id_of(events))
    assert assistant["tool_calls"] == [
        {
            "name": "add_task",
            "arguments": {"title": "buy milk"},
            "result": {"task_id": 1, "status": "created", "title": "buy milk"},
        }
    ]

    # The next message goes to the same conversation and sees the task.
    tid = thread_id_of(events)
    second = await stream(http, add(tid, "show my tasks"))
    assert [e["type"] for e in second][:2] == ["thread.item.done", "stream_options"]  # no thread.created
    assert second[0]["item"]["content"][0]["text"] == "show my tasks"
    assert "buy milk" in answer_of(second)["content"][0]["text"]
    assert [m["role"] for m in stored(engine, tid)] == ["user", "assistant", "user", "assistant"]


async def test_tool_calls_are_thread_items_live_and_on_reload(http: httpx.AsyncClient, engine: Engine) -> None:
    events = await stream(http, create("add buy milk"))
    tid = thread_id_of(events)
    done = [e["item"] for e in events if e["type"] == "thread.item.done"]
    assert [i["type"] for i in done] == ["user_message", "client_tool_call", "assistant_message"]
    live = done[1]
    answer_id = done[2]["id"]
    expected = {
        "id": f"{answer_id}:tool:0",
        "thread_id": tid,
        "type": "client_tool_call",
        "status": "completed",
        "call_id": f"{answer_id}:tool:0",
        "name": "add_task",
        "arguments": {"title": "buy milk"},
        "output": {"task_id": 1, "status": "created", "title": "buy milk"},
    }
    assert {k: v for k, v in live.items() if k != "created_at"} == expected

    # Reloaded (threads.get_by_id, items.list), the thread shows the same item from the stored reply.
    thread = await call(http, "threads.get_by_id", thread_id=tid)
    items = thread["items"]["data"]
    assert [i["type"] for i in items] == ["user_message", "client_tool_call", "assistant_message"]
    assert {k: v for k, v in items[1].items() if k != "created_at"} == expected
    listed = await call(http, "items.list", thread_id=tid, order="asc")
    assert [i["id"] for i in listed["data"]] == [i["id"] for i in items]
    # ChatKit's own types read them back.
    parsed = TypeAdapter(list[ThreadItem]).validate_python(items)
    assert isinstance(parsed[1], ClientToolCallItem)

    # The item is not a message that can be answered again; another user sees none of it.
    retry = {"type": "threads.retry_after_item", "params": {"thread_id": tid, "item_id": expected["id"]}}
    response = await post(http, retry)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")
    for body in ({"type": "items.list", "params": {"thread_id": tid}}, {**retry}):
        response = await post(http, body, BOB)
        assert (response.status_code, error_body(response)) == (404, NOT_FOUND), body["type"]
    assert len(stored(engine, tid)) == 2


async def test_no_db_connection_is_held_while_the_model_runs(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel
) -> None:
    app, http = scripted_app
    seen: list[int] = []

    def respond(call: ModelCall) -> Any:
        seen.append(app.state.engine.pool.checkedout())
        return [assistant_message("ok")]

    scripted.enqueue(ModelStep.respond(respond))
    events = await stream(http, create("hello"))
    assert answer_of(events)["content"][0]["text"] == "ok"
    assert seen == [0]


# --- the real model path: LiteLLM + Gemini stub, history from our database --------------------------


@pytest.fixture
def gemini(stack_settings: Settings, stub: GeminiStub) -> tuple[GeminiStub, Settings]:
    settings = stack_settings.model_copy(
        update={
            "chat_model": "gemini/gemini-2.5-flash",
            "gemini_api_key": GEMINI_TEST_KEY,
            "model_api_base": stub.base_url,
            "model_max_retries": 1,
            "model_timeout_seconds": 2.0,
        }
    )
    return stub, settings


async def test_second_turn_sends_the_first_turn_to_the_model(
    gemini: tuple[GeminiStub, Settings], engine: Engine
) -> None:
    stub, settings = gemini
    stub.reply_text("Nice to meet you, Ada.")
    stub.reply_text("Your name is Ada.")
    async with api_client(settings) as http:
        first = await stream(http, create("My name is Ada."))
        tid = thread_id_of(first)
        assert answer_of(first)["content"][0]["text"] == "Nice to meet you, Ada."
        second = await stream(http, add(tid, "What is my name?"))
    assert answer_of(second)["content"][0]["text"] == "Your name is Ada."
    assert not any(e["type"] == "error" for e in second)
    # The second request carried the first turn as plain user/model text (built from our database,
    # so ChatKit's output_text parts never reach LiteLLM's chat-completions converter).
    request = stub.requests[-1]
    assert request.roles == ["user", "model", "user"]
    texts = [[p.get("text") for p in c["parts"]] for c in request.contents]
    assert texts == [["My name is Ada."], ["Nice to meet you, Ada."], ["What is my name?"]]
    assert [m["status"] for m in stored(engine, tid)] == ["complete"] * 4


async def test_model_failure_is_an_error_event_and_is_stored(
    gemini: tuple[GeminiStub, Settings], engine: Engine
) -> None:
    stub, settings = gemini
    for _ in range(3):  # more than the SDK's retries
        stub.reply_error(500)
    async with api_client(settings) as http:
        response = await post(http, create("hi"))
        assert response.status_code == 200
        events = parse_events(response.text)
        tid = thread_id_of(events)
        items = await call(http, "items.list", thread_id=tid, order="asc")
    assert SECRET_MARKER not in response.text and "Traceback" not in response.text
    errors = [e for e in events if e["type"] == "error"]
    assert errors == [
        {"type": "error", "code": "custom", "message": "The model provider returned an error", "allow_retry": True}
    ]
    assert not [e for e in events if e["type"] == "thread.item.added"]  # no empty answer bubble
    assert [(m["role"], m["status"], m["error_code"]) for m in stored(engine, tid)] == [
        ("user", "complete", None),
        ("assistant", "error", "model_error"),
    ]
    # The failed reply said nothing: the transcript shows the user's message only.
    assert [i["type"] for i in items["data"]] == ["user_message"]


# --- retry (ChatKit's retry_after_item) -------------------------------------------------------------


async def test_retry_answers_the_same_message_again(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel, engine: Engine
) -> None:
    _, http = scripted_app
    scripted.extend(
        [
            litellm.AuthenticationError("bad key", "gemini", "x"),
            [assistant_message("better now")],
            [assistant_message("v2")],
        ]
    )
    events = await stream(http, create("hello"))
    tid, user_id = thread_id_of(events), events[1]["item"]["id"]
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["allow_retry"] is False and "credentials" in error["message"]

    retried = await stream(http, {"type": "threads.retry_after_item", "params": {"thread_id": tid, "item_id": user_id}})
    assert answer_of(retried)["content"][0]["text"] == "better now"
    # One user message; the failed attempt stays on record; the model saw the message once.
    assert [(m["role"], m["status"]) for m in stored(engine, tid)] == [
        ("user", "complete"),
        ("assistant", "error"),
        ("assistant", "complete"),
    ]
    assert [item["content"] for item in scripted.calls[-1].input] == ["hello"]

    # Retrying an answered message replaces the answer (ChatKit removes the items after it first).
    again = await stream(http, {"type": "threads.retry_after_item", "params": {"thread_id": tid, "item_id": user_id}})
    assert answer_of(again)["content"][0]["text"] == "v2"
    items = await call(http, "items.list", thread_id=tid, order="asc")
    assert [(i["type"], i["id"]) for i in items["data"]] == [
        ("user_message", user_id),
        ("assistant_message", answer_of(again)["id"]),
    ]


# --- conversations made over REST, and the other way round ---------------------------------------------


async def test_rest_conversation_is_a_chatkit_thread(http: httpx.AsyncClient, engine: Engine) -> None:
    made = (await http.post("/api/chat", json={"message": "add buy milk"}, headers=ALICE)).json()
    cid = made["conversation_id"]
    threads = await call(http, "threads.list")
    assert [(t["id"], t["title"]) for t in threads["data"]] == [(cid, "add buy milk")]
    thread = await call(http, "threads.get_by_id", thread_id=cid)
    rest = (await http.get(f"/api/conversations/{cid}", headers=ALICE)).json()["messages"]
    user, tool, answer = thread["items"]["data"]
    assert [user["id"], answer["id"]] == [m["id"] for m in rest] and answer["id"] == made["message_id"]
    assert answer["content"][0]["text"] == made["response"]
    assert (tool["type"], tool["name"], tool["output"]) == (
        "client_tool_call",
        "add_task",
        rest[1]["tool_calls"][0]["result"],
    )

    # Continued over ChatKit, it is still the same conversation for REST.
    events = await stream(http, add(cid, "show my tasks"))
    assert "buy milk" in answer_of(events)["content"][0]["text"]
    detail = (await http.get(f"/api/conversations/{cid}", headers=ALICE)).json()
    assert [m["content"] for m in detail["messages"]][2] == "show my tasks"
    assert detail["messages"][3]["id"] == answer_of(events)["id"]


# --- isolation ------------------------------------------------------------------------------------------


async def test_another_users_thread_answers_like_a_missing_one(http: httpx.AsyncClient, engine: Engine) -> None:
    events = await stream(http, create("hello"))
    tid, user_item = thread_id_of(events), events[1]["item"]["id"]
    before = stored(engine, tid)
    for missing in (str(uuid.uuid4()), "thr_not_a_uuid"):
        response = await post(http, {"type": "threads.get_by_id", "params": {"thread_id": missing}})
        assert (response.status_code, error_body(response)) == (404, NOT_FOUND)

    requests = [
        {"type": "threads.get_by_id", "params": {"thread_id": tid}},
        {"type": "items.list", "params": {"thread_id": tid}},
        {"type": "threads.update", "params": {"thread_id": tid, "title": "mine now"}},
        {"type": "threads.delete", "params": {"thread_id": tid}},
        {"type": "threads.retry_after_item", "params": {"thread_id": tid, "item_id": user_item}},
        add(tid, "show me alice's stuff"),
    ]
    for body in requests:
        response = await post(http, body, BOB)
        assert (response.status_code, error_body(response)) == (404, NOT_FOUND), body["type"]
    assert (await call(http, "threads.list", BOB))["data"] == []
    assert stored(engine, tid) == before
    assert (await call(http, "threads.get_by_id", thread_id=tid))["title"] == "hello"


# --- lists, rename, delete ---------------------------------------------------------------------------


async def test_threads_list_pages_newest_first(http: httpx.AsyncClient) -> None:
    for i in range(3):
        assert (await http.post("/api/chat", json={"message": f"hello {i}"}, headers=ALICE)).status_code == 200
    rest = [c["id"] for c in (await http.get("/api/conversations", headers=ALICE)).json()["data"]]
    first = await call(http, "threads.list", limit=2)
    assert [t["id"] for t in first["data"]] == rest[:2]
    assert first["has_more"] is True
    second = await call(http, "threads.list", limit=2, after=first["after"])
    assert [t["id"] for t in second["data"]] == rest[2:]
    assert second["has_more"] is False
    oldest_first = await call(http, "threads.list", order="asc")
    assert [t["id"] for t in oldest_first["data"]] == rest[::-1]
    bad = await post(http, {"type": "threads.list", "params": {"after": "garbage!"}})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"


async def test_items_list_pages_by_item_id(http: httpx.AsyncClient) -> None:
    cid = None
    for message in ("hello", "add buy milk", "show my tasks"):
        body = {"message": message, "conversation_id": cid}
        cid = (await http.post("/api/chat", json=body, headers=ALICE)).json()["conversation_id"]
    ids = [m["id"] for m in (await http.get(f"/api/conversations/{cid}", headers=ALICE)).json()["messages"]]
    assert len(ids) == 6

    # A page holds `limit` messages; a reply brings its tool call items along (before it, in asc order).
    add_call, list_call = f"{ids[3]}:tool:0", f"{ids[5]}:tool:0"
    first = await call(http, "items.list", thread_id=cid, order="asc", limit=4)
    assert [i["id"] for i in first["data"]] == [*ids[:3], add_call, ids[3]]
    assert first["has_more"] is True and first["after"] == ids[3]
    rest = await call(http, "items.list", thread_id=cid, order="asc", limit=4, after=first["after"])
    assert [i["id"] for i in rest["data"]] == [ids[4], list_call, ids[5]]
    assert rest["has_more"] is False
    newest = await call(http, "items.list", thread_id=cid, limit=2)  # ChatKit's default order is desc
    assert [i["id"] for i in newest["data"]] == [ids[5], list_call, ids[4]]
    older = await call(http, "items.list", thread_id=cid, limit=2, after=newest["after"])
    assert [i["id"] for i in older["data"]] == [ids[3], add_call, ids[2]]
    types = ["user_message", "assistant_message", "user_message", "client_tool_call", "assistant_message"]
    assert [i["type"] for i in first["data"]] == types
    # A tool call item's id continues after its whole reply.
    after_call = await call(http, "items.list", thread_id=cid, order="asc", after=add_call)
    assert [i["id"] for i in after_call["data"]] == [ids[4], list_call, ids[5]]
    bad = await post(http, {"type": "items.list", "params": {"thread_id": cid, "after": str(uuid.uuid4())}})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"


async def test_rename(http: httpx.AsyncClient) -> None:
    tid = thread_id_of(await stream(http, create("hello")))
    renamed = await call(http, "threads.update", thread_id=tid, title="  Groceries ")
    assert renamed["title"] == "Groceries"
    assert (await http.get(f"/api/conversations/{tid}", headers=ALICE)).json()["title"] == "Groceries"
    assert (await call(http, "threads.list"))["data"][0]["title"] == "Groceries"
    for title in ("", "   ", "x" * 201, "a\x00b"):
        response = await post(http, {"type": "threads.update", "params": {"thread_id": tid, "title": title}})
        assert response.status_code == 422 and response.json()["code"] == "validation_error", title


async def test_delete(http: httpx.AsyncClient, engine: Engine) -> None:
    tid = thread_id_of(await stream(http, create("hello")))
    assert await call(http, "threads.delete", thread_id=tid) == {}
    response = await post(http, {"type": "threads.get_by_id", "params": {"thread_id": tid}})
    assert (response.status_code, error_body(response)) == (404, NOT_FOUND)
    assert (await http.get(f"/api/conversations/{tid}", headers=ALICE)).status_code == 404
    assert stored(engine, tid) == []


# --- refused input ---------------------------------------------------------------------------------------


async def test_attachments_are_refused_before_anything_is_stored(http: httpx.AsyncClient, engine: Engine) -> None:
    response = await post(http, create("look at this", attachments=["atc_123"]))
    assert response.status_code == 400
    assert response.json()["code"] == "attachments_not_supported"
    assert count(engine, "conversation") == 0

    tid = thread_id_of(await stream(http, create("hello")))
    body = {
        "type": "threads.add_user_message",
        "params": {"thread_id": tid, "input": user_input("and this", ["atc_1"])},
    }
    assert (await post(http, body)).status_code == 400
    assert len(stored(engine, tid)) == 2
    upload = {"type": "attachments.create", "params": {"name": "a.png", "size": 10, "mime_type": "image/png"}}
    response = await post(http, upload)
    assert (response.status_code, response.json()["code"]) == (400, "attachments_not_supported")


@pytest.mark.parametrize(
    "body",
    [
        {"type": "threads.explode", "params": {}},
        {"type": "threads.create", "params": {}},
        create(""),
        create("   "),
        create("x" * 8001),
        create("a\x00b"),
    ],
)
async def test_invalid_requests_are_422(http: httpx.AsyncClient, engine: Engine, body: Any) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = await http.post("/chatkit", content=content, headers={**ALICE, "content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert count(engine, "conversation") == 0


async def test_a_body_that_is_not_json_is_400(http: httpx.AsyncClient, engine: Engine) -> None:
    response = await http.post("/chatkit", content="not json", headers={**ALICE, "content-type": "application/json"})
    assert (response.status_code, response.json()["code"]) == (400, "bad_request")
    assert response.json()["detail"][0]["type"] == "json_invalid"
    assert count(engine, "conversation") == 0


async def test_unsupported_requests_are_400(http: httpx.AsyncClient) -> None:
    transcribe = {"type": "input.transcribe", "params": {"audio_base64": "", "mime_type": "audio/webm"}}
    response = await post(http, transcribe)
    assert (response.status_code, response.json()["code"]) == (400, "unsupported_request")


async def test_requires_a_token(http: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}):
        response = await http.post("/chatkit", json={"type": "threads.list", "params": {}}, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["code"] == "unauthorized"


# --- concurrency and disconnects ------------------------------------------------------------------------


async def test_message_while_a_turn_runs_is_an_error_event(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel, engine: Engine
) -> None:
    _, http = scripted_app
    scripted.enqueue([assistant_message("first")])
    tid = thread_id_of(await stream(http, create("start")))
    release, entered = asyncio.Event(), asyncio.Event()

    async def hold(call: ModelCall) -> Any:
        entered.set()
        await release.wait()
        return [assistant_message("done")]

    scripted.enqueue(ModelStep.respond(hold))
    running = asyncio.create_task(stream(http, add(tid, "slow one")))
    await asyncio.wait_for(entered.wait(), 10)
    blocked = await stream(http, add(tid, "interleave?"))
    assert blocked[-1] == {
        "type": "error",
        "code": "custom",
        "message": "A reply is already being generated in this conversation",
        "allow_retry": True,
    }
    # A retry would remove the running turn's message: refused the same way.
    first_user = (await call(http, "items.list", thread_id=tid, order="asc"))["data"][0]["id"]
    retry = await stream(
        http, {"type": "threads.retry_after_item", "params": {"thread_id": tid, "item_id": first_user}}
    )
    assert retry[-1]["type"] == "error" and retry[-1]["message"] == blocked[-1]["message"]
    release.set()
    assert answer_of(await running)["content"][0]["text"] == "done"
    # Nothing interleaved: the refused message was not stored.
    assert [m["content"] for m in stored(engine, tid)] == ["start", "first", "slow one", "done"]


async def test_disconnect_mid_answer_stores_it_as_aborted(stack_settings: Settings, engine: Engine) -> None:
    model = ScriptableOffline(stall_after=3)
    settings = stack_settings.model_copy(update={"sse_heartbeat_seconds": 0.05})
    with serve_in_thread(create_app(settings, model_factory=lambda: model)) as base:
        seen: list[dict[str, Any]] = []
        heartbeats = 0
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("POST", "/chatkit", json=create("hello"), headers=ALICE) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                elif line.startswith(":") and len(deltas(seen)) == 3:
                    heartbeats += 1  # the model is stalled after 3 tokens, the stream stays alive
                    if heartbeats == 2:
                        break
        assert len(deltas(seen)) == 3  # these tokens left before the answer was finished
        tid = thread_id_of(seen)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(stored(engine, tid)) < 2:
            await asyncio.sleep(0.05)
        user, assistant = stored(engine, tid)
        assert (user["content"], assistant["status"]) == ("hello", "aborted")
        assert assistant["content"] == "".join(deltas(seen))
        assert assistant["id"] == next(e["item"]["id"] for e in seen if e["type"] == "thread.item.added")

        # The conversation is free again, and the partial answer shows in the transcript.
        model.stall_after = None
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            again = parse_events((await http.post("/chatkit", json=add(tid, "hello"), headers=ALICE)).text)
            items = (
                await http.post("/chatkit", json={"type": "items.list", "params": {"thread_id": tid}}, headers=ALICE)
            ).json()
        assert answer_of(again)["content"][0]["text"]
        assert len(items["data"]) == 4
