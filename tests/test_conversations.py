"""Conversation listing, reading, renaming and deleting; ownership answers like absence."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.conftest import make_settings
from tests.support import seed
from tests.support.stack import api_client
from tests.support.tokens import auth

ALICE, BOB = auth("alice"), auth("bob")


async def test_list_is_newest_first_with_summaries(client: httpx.AsyncClient, engine: Engine) -> None:
    old = seed.conversation(engine, "alice", title="old", messages=2, age_minutes=10)
    new = seed.conversation(engine, "alice", title="new", messages=3, age_minutes=1)
    seed.conversation(engine, "bob", title="bob's")
    body = (await client.get("/api/conversations", headers=ALICE)).json()
    assert [c["id"] for c in body["data"]] == [str(new), str(old)]
    first = body["data"][0]
    assert first["title"] == "new"
    assert first["message_count"] == 3
    assert first["last_message_preview"] == "user message 3"
    assert body["next_cursor"] is None


async def test_keyset_pagination_walks_every_conversation_once(client: httpx.AsyncClient, engine: Engine) -> None:
    ids = [seed.conversation(engine, "alice", title=f"c{i}", age_minutes=i) for i in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/api/conversations", params=params, headers=ALICE)).json()
        assert len(body["data"]) <= 3
        seen += [c["id"] for c in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [str(i) for i in ids]


async def test_pagination_stable_when_timestamps_tie(client: httpx.AsyncClient, engine: Engine) -> None:
    ids = {seed.conversation(engine, "alice") for _ in range(5)}
    with engine.begin() as conn:
        conn.execute(text("UPDATE conversation SET updated_at = '2026-01-01T00:00:00Z'"))
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/api/conversations", params=params, headers=ALICE)).json()
        seen += [c["id"] for c in body["data"]]
        if (cursor := body["next_cursor"]) is None:
            break
    assert sorted(seen) == sorted(str(i) for i in ids)
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "not-a-cursor"}, {"cursor": "e30"}]
)
async def test_list_bad_params(client: httpx.AsyncClient, params: dict[str, object]) -> None:
    response = await client.get("/api/conversations", params=params, headers=ALICE)
    assert response.status_code == 422
    assert response.json()["code"] in {"validation_error", "invalid_cursor"}


async def test_read_newest_window_and_page_back(client: httpx.AsyncClient, engine: Engine) -> None:
    conv = seed.conversation(engine, "alice", messages=7)
    body = (await client.get(f"/api/conversations/{conv}", params={"limit": 3}, headers=ALICE)).json()
    assert [m["seq"] for m in body["messages"]] == [5, 6, 7]
    assert body["messages"][0]["role"] == "user"
    assert body["messages"][0]["status"] == "complete"
    older = (
        await client.get(
            f"/api/conversations/{conv}", params={"limit": 3, "before": body["next_before"]}, headers=ALICE
        )
    ).json()
    assert [m["seq"] for m in older["messages"]] == [2, 3, 4]
    oldest = (
        await client.get(
            f"/api/conversations/{conv}", params={"limit": 3, "before": older["next_before"]}, headers=ALICE
        )
    ).json()
    assert [m["seq"] for m in oldest["messages"]] == [1]
    assert oldest["next_before"] is None


async def test_before_from_another_conversation_is_refused(client: httpx.AsyncClient, engine: Engine) -> None:
    conv = seed.conversation(engine, "alice", messages=2)
    response = await client.get(f"/api/conversations/{conv}", params={"before": str(uuid.uuid4())}, headers=ALICE)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_before"


async def test_other_users_conversation_answers_like_missing(client: httpx.AsyncClient, engine: Engine) -> None:
    conv = seed.conversation(engine, "alice", title="private", messages=2)
    missing = uuid.uuid4()
    for method, extra in [("GET", {}), ("PATCH", {"json": {"title": "pwned"}}), ("DELETE", {})]:
        theirs = await client.request(method, f"/api/conversations/{conv}", headers=BOB, **extra)  # type: ignore[arg-type]
        absent = await client.request(method, f"/api/conversations/{missing}", headers=BOB, **extra)  # type: ignore[arg-type]
        assert theirs.status_code == absent.status_code == 404
        same = {"detail": "Conversation not found", "code": "not_found", "request_id": None}
        assert {**theirs.json(), "request_id": None} == {**absent.json(), "request_id": None} == same
    body = (await client.get(f"/api/conversations/{conv}", headers=ALICE)).json()
    assert body["title"] == "private"
    assert len(body["messages"]) == 2


async def test_invalid_uuid_is_422(client: httpx.AsyncClient) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = await client.request(method, "/api/conversations/not-a-uuid", headers=ALICE)
        assert response.status_code == 422
        assert response.json()["code"] == "validation_error"


async def test_rename(client: httpx.AsyncClient, engine: Engine) -> None:
    conv = seed.conversation(engine, "alice", title="before", messages=1)
    response = await client.patch(f"/api/conversations/{conv}", json={"title": "  Groceries  "}, headers=ALICE)
    assert response.status_code == 200
    assert response.json()["title"] == "Groceries"
    assert response.json()["message_count"] == 1
    assert (await client.get(f"/api/conversations/{conv}", headers=ALICE)).json()["title"] == "Groceries"


@pytest.mark.parametrize(
    "body",
    [
        {"title": ""},
        {"title": "   "},
        {"title": "x" * 201},
        {"title": "a\x00b"},
        {},
        {"title": 5},
        {"title": "ok", "user_id": "bob"},
    ],
)
async def test_rename_bad_input(client: httpx.AsyncClient, engine: Engine, body: dict[str, object]) -> None:
    conv = seed.conversation(engine, "alice")
    response = await client.patch(f"/api/conversations/{conv}", json=body, headers=ALICE)
    assert response.status_code == 422


async def test_delete_removes_messages_and_second_delete_is_404(client: httpx.AsyncClient, engine: Engine) -> None:
    conv = seed.conversation(engine, "alice", messages=4)
    assert (await client.delete(f"/api/conversations/{conv}", headers=ALICE)).status_code == 204
    with engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM message WHERE conversation_id = :c"), {"c": conv}).scalar()
    assert left == 0
    assert (await client.delete(f"/api/conversations/{conv}", headers=ALICE)).status_code == 404
    assert (await client.get(f"/api/conversations/{conv}", headers=ALICE)).status_code == 404


async def test_body_too_large_is_413(client: httpx.AsyncClient, engine: Engine) -> None:
    conv = seed.conversation(engine, "alice")
    response = await client.patch(
        f"/api/conversations/{conv}", content=b'{"title": "' + b"x" * 70_000 + b'"}', headers=ALICE
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


async def test_chunked_body_too_large_is_413(client: httpx.AsyncClient, engine: Engine) -> None:
    conv = seed.conversation(engine, "alice")

    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"title": "'
        for _ in range(20):
            yield b"x" * 5_000
        yield b'"}'

    response = await client.patch(f"/api/conversations/{conv}", content=chunks(), headers=ALICE)
    assert response.status_code == 413


async def test_health(client: httpx.AsyncClient) -> None:
    body = (await client.get("/health")).json()
    assert body["status"] == "ok"
    assert body["version"]


async def test_cors_preflight_only_for_configured_origins(database_url: str) -> None:
    settings = make_settings(database_url, cors_origins="http://localhost:3000")
    async with api_client(settings) as http:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        ok = await http.options("/chatkit", headers={"Origin": "http://localhost:3000", **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        evil = await http.options("/chatkit", headers={"Origin": "http://evil.test", **preflight})
        assert "access-control-allow-origin" not in evil.headers


async def test_service_422s_are_shaped_like_validation_errors(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/conversations", params={"cursor": "bogus"}, headers=ALICE)
    body = response.json()
    assert body == {
        "detail": [{"loc": ["query", "cursor"], "msg": "cursor is not valid", "type": "invalid_cursor"}],
        "code": "invalid_cursor",
        "request_id": response.headers["x-request-id"],
    }


async def test_openapi_documents_errors(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    chat = spec["paths"]["/api/chat"]["post"]["responses"]
    assert {"200", "401", "404", "409", "413", "422", "502", "503", "504"} <= set(chat)
    assert chat["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    message = spec["components"]["schemas"]["ChatRequest"]["properties"]["message"]
    assert message["maxLength"] == 8000 and "pattern" in message
