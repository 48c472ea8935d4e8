"""POST /api/chat/stream read by common SSE client libraries (tests/js/sse), each used as its README
shows: `@microsoft/fetch-event-source` (onmessage + JSON.parse) and `eventsource-parser`. Heartbeats
must reach them as JSON events a handler can ignore, never as comments that parse as empty messages
and make fetch-event-source send the turn again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.config import Settings
from backend.main import create_app
from tests.support.models import ScriptableOffline
from tests.support.node import npm_project, run_node
from tests.support.servers import serve_in_thread
from tests.support.tokens import auth, user_token


@pytest.fixture(scope="session")
def sse_clients() -> Path:
    return npm_project("sse")


def test_sse_client_libraries(stack_settings: Settings, sse_clients: Path) -> None:
    # The model waits before each answer, so heartbeats go out mid-turn.
    settings = stack_settings.model_copy(update={"sse_heartbeat_seconds": 0.05})
    model = ScriptableOffline(pause=0.3)
    with serve_in_thread(create_app(settings, model_factory=lambda: model)) as base:
        out: Any = run_node(sse_clients, "clients.mjs", base, user_token("sse"))
        conversations = httpx.get(f"{base}/api/conversations", headers=auth("sse")).json()["data"]

    fes = out["fetchEventSource"]
    assert fes["errors"] == [] and fes["posts"] == 1, fes
    assert fes["heartbeats"] > 0
    assert fes["types"][0] == "start" and fes["types"][-1] == "complete", fes
    assert "tool_call" in fes["types"] and "token" in fes["types"]

    esp = out["eventsourceParser"]
    assert esp["status"] == 200 and esp["errors"] == [], esp
    assert esp["comments"] == 0 and esp["heartbeats"] > 0
    assert esp["types"][0] == "start" and esp["types"][-1] == "complete", esp

    # One conversation per client, each with one question and one answer: nothing was sent twice.
    assert sorted((c["title"], c["message_count"]) for c in conversations) == [
        ("add buy milk", 2),
        ("show my tasks", 2),
    ]
