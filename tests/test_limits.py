"""Per-user limits on what costs money: turn starts per minute, tokens per UTC day, turns at once.

Real concurrent requests against real PostgreSQL; two API instances share the limits (any replica
counts against the same row). A refused turn stores nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message
from sqlalchemy import Engine, text

from backend.config import Settings
from tests.support.chatkit import add, create, parse_events, thread_id_of
from tests.support.stack import api_client
from tests.support.tokens import auth

ALICE, BOB = auth("alice"), auth("bob")


def stored_messages(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM message")).scalar_one())


async def chat(http: httpx.AsyncClient, message: str, headers: dict[str, str] = ALICE, **extra: Any) -> Any:
    return await http.post("/api/chat", json={"message": message, **extra}, headers=headers)


@pytest.fixture
def limited(stack_settings: Settings) -> Settings:
    return stack_settings.model_copy(update={"user_turns_per_minute": 3})


@pytest.fixture
async def http(limited: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(limited) as client:
        yield client


async def test_turn_starts_per_minute(http: httpx.AsyncClient, engine: Engine) -> None:
    first = await chat(http, "hello", client_message_id="k1")
    assert first.status_code == 200
    for i in range(2):
        assert (await chat(http, f"hello {i}")).status_code == 200
    before = stored_messages(engine)
    refused = await chat(http, "one too many")
    assert refused.status_code == 429
    body = refused.json()
    assert (body["code"], body["retryable"]) == ("rate_limited", True)
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one start every 60/3 s
    assert refused.headers["ratelimit-policy"] == '"turns";q=3;w=60'
    assert stored_messages(engine) == before  # refused before the message was stored

    # Replays and reads cost nothing; another user has limits of their own.
    assert (await chat(http, "hello", client_message_id="k1")).json()["message_id"] == first.json()["message_id"]
    assert (await http.get("/api/conversations", headers=ALICE)).status_code == 200
    assert (await chat(http, "hi", BOB)).status_code == 200
    # The stream and ChatKit are turns too.
    streamed = await http.post("/api/chat/stream", json={"message": "x"}, headers=ALICE)
    assert streamed.status_code == 429
    events = parse_events((await http.post("/chatkit", json=create("x"), headers=ALICE)).text)
    assert events[-1]["type"] == "error" and "slow down" in events[-1]["message"]
    assert not [e for e in events if e["type"] == "thread.item.done"]  # the refused message is not shown


async def test_simultaneous_starts_are_counted_atomically(http: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(chat(http, f"hello {i}") for i in range(10)))
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 7


async def test_replicas_share_the_limits(limited: Settings) -> None:
    async with api_client(limited) as one, api_client(limited) as two:
        assert (await chat(one, "a")).status_code == 200
        assert (await chat(two, "b")).status_code == 200
        assert (await chat(one, "c")).status_code == 200
        assert (await chat(two, "d")).status_code == 429


async def test_tokens_per_day(stack_settings: Settings, engine: Engine) -> None:
    settings = stack_settings.model_copy(update={"user_tokens_per_day": 100, "user_turns_per_minute": 0})
    async with api_client(settings) as http:
        spent = (await chat(http, "add buy milk")).json()["usage"]["total_tokens"]
        assert spent >= 100  # the offline model reports the instructions and history as input
        refused = await chat(http, "add buy bread")
        assert refused.status_code == 429 and refused.json()["code"] == "quota_exceeded"
        assert 0 < int(refused.headers["retry-after"]) <= 24 * 3600  # until midnight UTC
        assert (await chat(http, "hello", BOB)).status_code == 200
        with engine.connect() as conn:
            used = conn.execute(text("SELECT tokens_used FROM user_quota WHERE user_id = 'alice'")).scalar_one()
        assert used == spent


async def test_turns_at_once(stack_settings: Settings) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(call: ModelCall) -> Any:
        entered.set()
        await release.wait()
        return [assistant_message("slow")]

    model = ScriptedModel([ModelStep.respond(hold), [assistant_message("fast")], [assistant_message("later")]])
    settings = stack_settings.model_copy(update={"user_concurrent_turns": 1})
    async with api_client(settings, model_factory=lambda: model) as http:
        running = asyncio.create_task(chat(http, "slow one"))
        await asyncio.wait_for(entered.wait(), 10)
        refused = await chat(http, "meanwhile, elsewhere")
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
        assert (await chat(http, "mine", BOB)).status_code == 200
        release.set()
        assert (await running).status_code == 200
        assert (await chat(http, "now")).status_code == 200


async def test_chatkit_turns_count_too(http: httpx.AsyncClient) -> None:
    tid = thread_id_of(parse_events((await http.post("/chatkit", json=create("one"), headers=ALICE)).text))
    for message in ("two", "three"):
        assert (
            parse_events((await http.post("/chatkit", json=add(tid, message), headers=ALICE)).text)[-1]["type"]
            != "error"
        )
    refused = parse_events((await http.post("/chatkit", json=add(tid, "four"), headers=ALICE)).text)
    assert refused[-1]["type"] == "error" and refused[-1]["allow_retry"] is True
