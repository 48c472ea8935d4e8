"""The turn's promises at the edges: read-your-writes, one key one request, honest regenerate,
fenced leases, whole answers, usage on every outcome, streams that end with an event, safe cursors.

Real PostgreSQL, the real MCP server over HTTP, real concurrent requests; only the model is scripted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import litellm
import pytest
from agents import Usage
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from fastapi import FastAPI
from sqlalchemy import Engine, text

from backend.config import Settings
from backend.main import create_app
from tests.support.chatkit import add, answer_of, create, parse_events, thread_id_of
from tests.support.models import ScriptableOffline
from tests.support.servers import serve_in_thread
from tests.support.stack import api_client
from tests.support.tokens import auth

ALICE, BOB = auth("alice"), auth("bob")


def rows(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(sql), params)]


def messages(engine: Engine, conversation_id: str | None = None) -> list[dict[str, Any]]:
    where = "WHERE conversation_id = :c" if conversation_id else ""
    return rows(
        engine,
        f"SELECT conversation_id, role, content, status, usage, client_message_id FROM message {where}"
        " ORDER BY conversation_id, seq",
        c=conversation_id,
    )


def lease(engine: Engine, conversation_id: str) -> tuple[Any, Any]:
    (row,) = rows(engine, "SELECT turn_id, turn_lease_until FROM conversation WHERE id = :c", c=conversation_id)
    return row["turn_id"], row["turn_lease_until"]


async def chat(http: httpx.AsyncClient, message: str, conversation_id: str | None = None, **extra: Any) -> Any:
    headers = extra.pop("headers", ALICE)
    body = {"message": message, "conversation_id": conversation_id, **extra}
    return await http.post("/api/chat", json=body, headers=headers)


def held_model(*before: Any) -> tuple[ScriptedModel, asyncio.Event, asyncio.Event, list[str]]:
    """A scripted model whose last step waits until released; records whether it was cancelled."""
    entered, release, fate = asyncio.Event(), asyncio.Event(), []

    async def hold(call: ModelCall) -> Any:
        entered.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            fate.append("cancelled")
            raise
        fate.append("finished")
        return [assistant_message("late answer")]

    return ScriptedModel([*before, ModelStep.respond(hold)]), entered, release, fate


@pytest.fixture
async def http(stack_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack_settings) as client:
        yield client


# --- 1. read-your-writes ----------------------------------------------------------------------------


async def test_rename_and_delete_are_committed_before_the_response(stack_settings: Settings, engine: Engine) -> None:
    """On one keep-alive connection, a GET right after a 2xx PATCH/DELETE sees it."""
    # 31 turns of one user: on a fast machine they would meet the per-minute turn limit (tests/test_limits.py).
    settings = stack_settings.model_copy(update={"user_turns_per_minute": 0})
    with serve_in_thread(create_app(settings)) as base:
        async with httpx.AsyncClient(base_url=base, headers=ALICE, timeout=30) as http:
            cid = (await chat(http, "hello")).json()["conversation_id"]
            stale = 0
            for i in range(60):
                assert (await http.patch(f"/api/conversations/{cid}", json={"title": f"t{i}"})).status_code == 200
                stale += (await http.get(f"/api/conversations/{cid}")).json()["title"] != f"t{i}"
            assert stale == 0
            survivors = 0
            for _ in range(30):
                doomed = (await chat(http, "bye")).json()["conversation_id"]
                assert (await http.delete(f"/api/conversations/{doomed}")).status_code == 204
                survivors += (await http.get(f"/api/conversations/{doomed}")).status_code != 404
            assert survivors == 0


async def test_a_commit_that_fails_is_an_error_not_a_2xx(
    client: httpx.AsyncClient, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    cid = (await client.post("/api/chat", json={"message": "hello"}, headers=ALICE)).json()["conversation_id"]
    with engine.begin() as conn:  # a deferred check: it fires at COMMIT, after the UPDATE succeeded
        conn.execute(
            text(
                """
                CREATE FUNCTION refuse_title() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.title = 'refused at commit' THEN RAISE EXCEPTION 'no'; END IF; RETURN NEW; END $$;
                CREATE CONSTRAINT TRIGGER refuse_title AFTER UPDATE ON conversation
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_title();
                """
            )
        )
    response = await client.patch(f"/api/conversations/{cid}", json={"title": "refused at commit"}, headers=ALICE)
    assert response.status_code >= 500
    assert response.json()["code"] and "Traceback" not in response.text
    assert (await client.get(f"/api/conversations/{cid}", headers=ALICE)).json()["title"] == "hello"
    # The failure is logged, without the statement's parameters (user ids, titles, message text).
    assert "refuse_title" in caplog.text and "refused at commit" not in caplog.text


# --- 2. one idempotency key, one request -------------------------------------------------------------


async def test_a_key_is_bound_to_its_message_and_conversation(http: httpx.AsyncClient, engine: Engine) -> None:
    client = http
    first = await chat(client, "add buy milk", client_message_id="k-1")
    cid = first.json()["conversation_id"]
    other = (await chat(client, "hello")).json()["conversation_id"]
    stored = messages(engine)

    for body in (
        {"message": "add buy bread", "client_message_id": "k-1"},  # same key, another message
        {"message": "add buy bread", "conversation_id": cid, "client_message_id": "k-1"},
        {"message": "add buy milk", "conversation_id": other, "client_message_id": "k-1"},  # another conversation
    ):
        reused = await client.post("/api/chat", json=body, headers=ALICE)
        assert reused.status_code == 422, body
        assert reused.json()["code"] == "idempotency_key_reused"
    assert messages(engine) == stored  # nothing stored, no turn ran

    # The same key and message is the stored answer, with or without the conversation named.
    for conversation_id in (None, cid):
        again = await chat(client, "add buy milk", conversation_id, client_message_id="k-1")
        assert again.status_code == 200
        assert again.json()["message_id"] == first.json()["message_id"]
    # Keys belong to a user: Bob's k-1 is his own.
    bobs = await chat(client, "add buy bread", client_message_id="k-1", headers=BOB)
    assert bobs.status_code == 200
    assert [m for m in messages(engine) if m["conversation_id"] != uuid.UUID(bobs.json()["conversation_id"])] == stored


async def test_a_key_is_unique_per_user_in_the_database(engine: Engine, http: httpx.AsyncClient) -> None:
    client = http
    await chat(client, "hello", client_message_id="k-9")
    other = (await chat(client, "hi")).json()["conversation_id"]
    with pytest.raises(Exception, match=r"unique|duplicate"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO message (id, conversation_id, user_id, seq, role, content, status, tool_calls,"
                " client_message_id) VALUES (:i, :c, 'alice', 99, 'user', 'x', 'complete', '[]', 'k-9')"
            ),
            {"i": uuid.uuid4(), "c": other},
        )


async def test_simultaneous_double_submits_run_one_turn(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel, engine: Engine
) -> None:
    _, http = scripted_app

    async def slow(call: ModelCall) -> Any:
        await asyncio.sleep(0.05)
        return [assistant_message("the one answer")]

    scripted.extend([ModelStep.respond(slow)] * 30)
    for pair in range(15):
        key = f"double-{pair}"
        first, second = await asyncio.gather(
            chat(http, "hello", client_message_id=key), chat(http, "hello", client_message_id=key)
        )
        statuses = sorted([first.status_code, second.status_code])
        assert statuses in ([200, 200], [200, 409]), (first.text, second.text)
        ok = [r.json() for r in (first, second) if r.status_code == 200]
        assert len({r["message_id"] for r in ok}) == 1
        busy = [r.json() for r in (first, second) if r.status_code == 409]
        assert all(b["code"] == "conversation_busy" for b in busy)
    conversations = rows(engine, "SELECT id FROM conversation")
    assert len(conversations) == 15
    assert len(scripted.calls) == 15


async def test_idempotency_key_header_is_an_alias(stack_settings: Settings, engine: Engine) -> None:
    with serve_in_thread(create_app(stack_settings)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            headers = {**ALICE, "Idempotency-Key": "hdr-1"}
            first = await http.post("/api/chat", json={"message": "hello"}, headers=headers)
            again = await http.post("/api/chat", json={"message": "hello"}, headers=headers)
            assert first.status_code == again.status_code == 200
            assert again.json()["message_id"] == first.json()["message_id"]
            body = {"message": "hello", "client_message_id": "hdr-1"}
            assert (await http.post("/api/chat", json=body, headers=ALICE)).json()["message_id"] == first.json()[
                "message_id"
            ]
            reused = await http.post("/api/chat", json={"message": "bye"}, headers=headers)
            assert (reused.status_code, reused.json()["code"]) == (422, "idempotency_key_reused")
            clash = await http.post("/api/chat", json={"message": "hi", "client_message_id": "x"}, headers=headers)
            assert clash.status_code == 422

            stream_headers = {**ALICE, "Idempotency-Key": "hdr-2"}
            async with http.stream("POST", "/api/chat/stream", json={"message": "hi"}, headers=stream_headers) as r:
                events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
            assert events[-1]["type"] == "complete"
    keys = {m["client_message_id"] for m in messages(engine) if m["role"] == "user"}
    assert keys == {"hdr-1", "hdr-2"}


# --- 3. regenerate is a new attempt, recovery replays ------------------------------------------------


async def test_chatkit_retry_runs_the_tools_again(http: httpx.AsyncClient, engine: Engine) -> None:
    events = parse_events((await http.post("/chatkit", json=create("add water plants"), headers=ALICE)).text)
    tid, user_item = thread_id_of(events), events[1]["item"]["id"]
    assert answer_of(events)["content"][0]["text"].startswith("Added task 1")
    # The user deletes the task (another conversation), then asks ChatKit for another answer.
    await chat(http, "delete task 1")
    assert rows(engine, "SELECT id FROM task") == []
    retry = {"type": "threads.retry_after_item", "params": {"thread_id": tid, "item_id": user_item}}
    again = parse_events((await http.post("/chatkit", json=retry, headers=ALICE)).text)
    assert answer_of(again)["content"][0]["text"].startswith("Added task")
    assert len(rows(engine, "SELECT id FROM task WHERE title = 'water plants'")) == 1  # it really exists


async def test_regenerating_an_earlier_message_removes_what_followed_it(
    http: httpx.AsyncClient, engine: Engine
) -> None:
    events = parse_events((await http.post("/chatkit", json=create("hello"), headers=ALICE)).text)
    tid, first = thread_id_of(events), events[1]["item"]["id"]
    assert (await chat(http, "show my tasks", tid)).status_code == 200
    retry = {"type": "threads.retry_after_item", "params": {"thread_id": tid, "item_id": first}}
    again = parse_events((await http.post("/chatkit", json=retry, headers=ALICE)).text)
    assert [m["content"][:5] for m in messages(engine, tid)] == ["hello", answer_of(again)["content"][0]["text"][:5]]
    listing = (await http.get("/api/conversations", headers=ALICE)).json()["data"]
    assert listing[0]["message_count"] == 2


# --- 4. leases: the database's clock, fenced, released at once -----------------------------------------


async def test_lease_is_judged_by_the_database_clock(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, http = scripted_app
    scripted.extend([[assistant_message("one")], [assistant_message("two")]])
    cid = (await chat(http, "one")).json()["conversation_id"]
    engine = scripted_app[0].state.engine
    with engine.begin() as conn:  # another replica holds the lease (by the database's clock)
        conn.execute(
            text("UPDATE conversation SET turn_id = :t, turn_lease_until = now() + interval '20 s' WHERE id = :c"),
            {"t": uuid.uuid4(), "c": cid},
        )
    # This replica's clock runs an hour fast: it must not think the lease has expired.
    import backend.models

    real = backend.models.utcnow
    for module in [m for name, m in sys.modules.items() if name.startswith("backend") and hasattr(m, "utcnow")]:
        monkeypatch.setattr(module, "utcnow", lambda: real() + timedelta(hours=1))
    assert (await chat(http, "two", cid)).status_code == 409


async def test_a_lost_lease_cancels_the_run_and_stores_nothing(stack_settings: Settings, engine: Engine) -> None:
    model, entered, _release, fate = held_model([assistant_message("hi")])
    settings = stack_settings.model_copy(update={"turn_lease_seconds": 0.6})
    async with api_client(settings, model_factory=lambda: model) as http:
        cid = (await chat(http, "hi")).json()["conversation_id"]
        running = asyncio.create_task(chat(http, "slow", cid))
        await asyncio.wait_for(entered.wait(), 10)
        thief = uuid.uuid4()
        with engine.begin() as conn:  # the lease was taken over (say this replica stalled past it)
            conn.execute(
                text("UPDATE conversation SET turn_id = :t, turn_lease_until = now() + interval '1 h' WHERE id = :c"),
                {"t": thief, "c": cid},
            )
        response = await asyncio.wait_for(running, 10)
    assert fate == ["cancelled"]
    assert response.status_code == 409 and response.json()["code"] == "conversation_busy"
    assert [m["content"] for m in messages(engine, cid)] == ["hi", "hi", "slow"]  # no reply over the new owner's turn
    assert lease(engine, cid)[0] == thief  # the new owner's lease is untouched


async def test_finish_stores_only_while_holding_the_lease(stack_settings: Settings, engine: Engine) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def answer_after_release(call: ModelCall) -> Any:
        entered.set()
        await asyncio.shield(release.wait())
        return [assistant_message("too late")]

    model = ScriptedModel([ModelStep.respond(answer_after_release)])
    settings = stack_settings.model_copy(update={"turn_lease_seconds": 30})  # no renewal during the test
    async with api_client(settings, model_factory=lambda: model) as http:
        running = asyncio.create_task(chat(http, "slow"))
        await asyncio.wait_for(entered.wait(), 10)
        (conversation,) = rows(engine, "SELECT id FROM conversation")
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE conversation SET turn_id = :t WHERE id = :c"), {"t": uuid.uuid4(), "c": conversation["id"]}
            )
        release.set()
        response = await asyncio.wait_for(running, 10)
    assert response.status_code == 409
    assert [m["role"] for m in messages(engine, str(conversation["id"]))] == ["user"]


async def test_a_client_gone_before_the_stream_starts_releases_the_lease(
    stack_settings: Settings, engine: Engine
) -> None:
    """The client hangs up right after its request: the turn was begun but its stream never starts."""
    app = create_app(stack_settings, model_factory=lambda: ScriptableOffline(pause=0.3))
    body = json.dumps({"message": "hello", "client_message_id": "gone-1"}).encode()
    token = ALICE["Authorization"].encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/chat/stream",
        "raw_path": b"/api/chat/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"authorization", token), (b"host", b"api")],
        "client": ("127.0.0.1", 1),
        "server": ("api", 80),
    }
    inbox = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            raise OSError("client gone")

    async with app.router.lifespan_context(app):
        with contextlib.suppress(OSError):
            await asyncio.wait_for(app(scope, receive, send), 10)
        (found,) = rows(engine, "SELECT id, turn_id FROM conversation")
        assert found["turn_id"] is None  # released at once, not after the 30 s lease
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
            retried = await chat(http, "hello", client_message_id="gone-1")
        assert retried.status_code == 200


# --- 5. deleting a busy conversation --------------------------------------------------------------


async def test_deleting_a_busy_conversation_is_409_and_the_turn_finishes(
    stack_settings: Settings, engine: Engine
) -> None:
    model, entered, release, _ = held_model([assistant_message("hi")])
    async with api_client(stack_settings, model_factory=lambda: model) as http:
        cid = (await chat(http, "hi")).json()["conversation_id"]
        running = asyncio.create_task(chat(http, "slow", cid))
        await asyncio.wait_for(entered.wait(), 10)
        refused = await http.delete(f"/api/conversations/{cid}", headers=ALICE)
        chatkit = await http.post(
            "/chatkit", json={"type": "threads.delete", "params": {"thread_id": cid}}, headers=ALICE
        )
        release.set()
        done = await running
        assert (refused.status_code, refused.json()["code"]) == (409, "conversation_busy")
        assert refused.json()["retryable"] is True
        assert chatkit.status_code == 409
        assert done.status_code == 200 and done.json()["response"] == "late answer"
        assert (await http.get(f"/api/conversations/{cid}", headers=ALICE)).status_code == 200
        assert (await http.delete(f"/api/conversations/{cid}", headers=ALICE)).status_code == 204


# --- 6. the stored answer reads right ---------------------------------------------------------------


async def test_text_before_and_after_a_tool_call_stays_apart(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel, engine: Engine
) -> None:
    app, http = scripted_app
    scripted.extend(
        [
            [assistant_message("Sure, on it."), function_call("add_task", {"title": "Milk"}, call_id="c1")],
            [assistant_message("Done. Added task 1: Milk.")],
        ]
    )
    body = (await chat(http, "add milk")).json()
    assert body["response"] == "Sure, on it.\n\nDone. Added task 1: Milk."
    (_, stored) = messages(engine, body["conversation_id"])
    assert stored["content"] == body["response"]

    scripted.extend(
        [
            [assistant_message("Sure, on it."), function_call("add_task", {"title": "Tea"}, call_id="c2")],
            [assistant_message("Done.")],
        ]
    )
    with serve_in_thread(create_app(app.state.settings, model_factory=lambda: scripted)) as base:
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as client,
            client.stream("POST", "/api/chat/stream", json={"message": "add tea"}, headers=ALICE) as response,
        ):
            events = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]
    complete = events[-1]
    assert complete["type"] == "complete" and complete["full_content"] == "Sure, on it.\n\nDone."
    assert "".join(e["token"] for e in events if e["type"] == "token") == complete["full_content"]


async def test_retrying_an_older_failed_message_is_refused(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel, engine: Engine
) -> None:
    _, http = scripted_app
    scripted.extend([litellm.AuthenticationError("bad key", "gemini", "x"), [assistant_message("second answer")]])
    failed = await chat(http, "first", client_message_id="old-1")
    assert failed.status_code == 502
    cid = failed.json()["conversation_id"]
    assert (await chat(http, "second", cid, client_message_id="new-1")).status_code == 200
    before = messages(engine, cid)
    late = await chat(http, "first", cid, client_message_id="old-1")
    assert late.status_code == 409 and late.json()["code"] == "retry_superseded"
    assert messages(engine, cid) == before


# --- 7. usage on every outcome ------------------------------------------------------------------------


async def test_usage_is_recorded_for_failed_and_aborted_turns(stack_settings: Settings, engine: Engine) -> None:
    model = ScriptedModel(
        [[function_call("list_tasks", {"status": "all"}, call_id="c1")]]
        + [litellm.InternalServerError("down", "gemini", "x")] * 5,
        default_usage=Usage(requests=1, input_tokens=40, output_tokens=2, total_tokens=42),
    )
    async with api_client(stack_settings, model_factory=lambda: model) as http:
        failed = await chat(http, "show my tasks")
    assert failed.status_code == 502
    (_, reply) = messages(engine, failed.json()["conversation_id"])
    assert reply["status"] == "error" and reply["usage"]["total_tokens"] == 42

    stalled = ScriptableOffline(stall_after=2)
    with serve_in_thread(create_app(stack_settings, model_factory=lambda: stalled)) as base:
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as client,
            client.stream("POST", "/api/chat/stream", json={"message": "add tea"}, headers=ALICE) as response,
        ):
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ") and json.loads(line[6:])["type"] == "token"
                if seen == 2:
                    break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [m for m in messages(engine) if m["status"] == "aborted"]:
            await asyncio.sleep(0.05)
    (aborted,) = [m for m in messages(engine) if m["status"] == "aborted"]
    assert aborted["usage"]["total_tokens"] > 0  # the add_task call's model response was paid for


# --- 8. streams always end with an event ------------------------------------------------------------


async def test_a_reply_that_cannot_be_stored_still_ends_the_stream_with_an_error(
    stack_settings: Settings, engine: Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                CREATE FUNCTION refuse_reply() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.role = 'assistant' THEN RAISE EXCEPTION 'disk full'; END IF; RETURN NEW; END $$;
                CREATE TRIGGER refuse_reply BEFORE INSERT ON message FOR EACH ROW EXECUTE FUNCTION refuse_reply();
                """
            )
        )
    with serve_in_thread(create_app(stack_settings)) as base:
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("POST", "/api/chat/stream", json={"message": "hello"}, headers=ALICE) as response,
        ):
            events = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[0]["type"] == "start"
    assert events[-1]["type"] == "error" and events[-1]["retryable"] is True
    assert "disk full" not in json.dumps(events)


async def test_a_chatkit_message_refused_as_busy_is_never_announced(
    scripted_app: tuple[FastAPI, httpx.AsyncClient], scripted: ScriptedModel, engine: Engine
) -> None:
    _, http = scripted_app
    scripted.enqueue([assistant_message("first")])
    tid = thread_id_of(parse_events((await http.post("/chatkit", json=create("start"), headers=ALICE)).text))
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(call: ModelCall) -> Any:
        entered.set()
        await release.wait()
        return [assistant_message("done")]

    scripted.enqueue(ModelStep.respond(hold))
    running = asyncio.create_task(http.post("/chatkit", json=add(tid, "slow one"), headers=ALICE))
    await asyncio.wait_for(entered.wait(), 10)
    blocked = await http.post("/chatkit", json=add(tid, "interleave?"), headers=ALICE)
    release.set()
    await running
    announced = (
        [
            e["item"]["id"]
            for e in parse_events(blocked.text)
            if e["type"] == "thread.item.done" and e["item"]["type"] == "user_message"
        ]
        if blocked.status_code == 200
        else []
    )
    assert announced == []
    assert blocked.status_code == 409 or parse_events(blocked.text)[-1]["type"] == "error"


# --- 9. bad cursors are 422 -------------------------------------------------------------------------------


def _cursor(updated_at: str) -> str:
    raw = json.dumps({"u": updated_at, "i": str(uuid.uuid4())}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "updated_at", ["2026-01-01T00:00:00+20:00", "2026-01-01T00:00:00-23:59", "0001-01-01T00:00:00+01:00", "2026-01-01"]
)
async def test_cursors_postgres_would_reject_are_422(client: httpx.AsyncClient, updated_at: str) -> None:
    rest = await client.get("/api/conversations", params={"cursor": _cursor(updated_at)}, headers=ALICE)
    assert (rest.status_code, rest.json()["code"]) == (422, "invalid_cursor")
    body = {"type": "threads.list", "params": {"after": _cursor(updated_at)}}
    chatkit = await client.post("/chatkit", json=body, headers=ALICE)
    assert (chatkit.status_code, chatkit.json()["code"]) == (422, "invalid_cursor")


# --- 10. a retry costs the same whatever the table size ---------------------------------------------


async def test_the_reply_lookup_uses_an_index_scoped_to_the_conversation(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    from backend.services.turn_store import latest_reply_query

    first = (await chat(client, "hello", client_message_id="r-1")).json()
    with engine.begin() as conn:  # 200k messages of someone else
        conn.execute(
            text(
                "INSERT INTO conversation (id, user_id, title, last_seq) VALUES (:c, 'zed', 'big', 200000);"
                "INSERT INTO message (id, conversation_id, user_id, seq, role, content, status, tool_calls, reply_to)"
                " SELECT gen_random_uuid(), :c, 'zed', g, 'assistant', 'x', 'complete', '[]', gen_random_uuid()"
                " FROM generate_series(1, 200000) g; ANALYZE message;"
            ),
            {"c": uuid.uuid4()},
        )
        query = latest_reply_query(uuid.UUID(first["conversation_id"]), uuid.uuid4())
        compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
        plan = json.dumps(conn.execute(text(f"EXPLAIN (FORMAT JSON) {compiled}")).scalar_one())
    assert "Seq Scan" not in plan
