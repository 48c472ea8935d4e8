"""What an operator sees: request ids end to end, Prometheus metrics, JSON logs.

In process for the API's answers; real `serve` and `mcp` processes (their stderr captured) for what
only processes show: the MCP server's log of a turn's tool calls, JSON log lines, and metrics summed
across `serve`'s worker processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.config import Settings
from tests.conftest import make_settings
from tests.support import db
from tests.support.servers import free_port, process_env, wait_http, worker_pids
from tests.support.stack import api_client
from tests.support.tokens import auth, user_token

ALICE = auth("alice-observed")
HEX_ID = re.compile(r"[0-9a-f]{32}")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


# --- request ids (in process) ----------------------------------------------------------------------


async def test_a_sane_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    for given in ("abc-123", "A.b_c:d-9", "x" * 128):
        response = await client.get("/health", headers={"X-Request-ID": given})
        assert response.headers["x-request-id"] == given


async def test_a_missing_or_insane_request_id_is_replaced_by_a_generated_one(client: httpx.AsyncClient) -> None:
    seen: set[str] = set()
    for given in (None, "", "has space", "x" * 129, "semi;colon", "ünïcode".encode(), "<script>"):
        headers = {"X-Request-ID": given} if given is not None else {}
        response = await client.get("/health", headers=headers)
        request_id = response.headers["x-request-id"]
        assert HEX_ID.fullmatch(request_id), (given, request_id)
        seen.add(request_id)
    assert len(seen) == 7  # a new one each time


async def test_error_bodies_carry_the_request_id(client: httpx.AsyncClient, settings: Settings) -> None:
    responses = [
        await client.get("/api/conversations", headers={"X-Request-ID": "err-401"}),  # no token
        await client.get("/no/such/route", headers={"X-Request-ID": "err-404"}),
        await client.post("/api/chat", json={}, headers={**ALICE, "X-Request-ID": "err-422"}),
        await client.post(
            "/api/chat",
            content=b"x" * (settings.max_body_bytes + 1),
            headers={**ALICE, "X-Request-ID": "err-413", "content-type": "application/json"},
        ),
    ]
    for response, status in zip(responses, (401, 404, 422, 413), strict=True):
        assert response.status_code == status
        assert response.json()["request_id"] == response.headers["x-request-id"] == f"err-{status}"


# --- metrics (in process) --------------------------------------------------------------------------


@pytest.fixture
async def http(stack_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack_settings.model_copy(update={"user_turns_per_minute": 2})) as client:
        yield client


async def test_metrics_after_a_turn(http: httpx.AsyncClient) -> None:
    before = (await http.get("/metrics")).text
    turn = await http.post("/api/chat", json={"message": "add buy milk"}, headers=ALICE)
    assert turn.status_code == 200 and turn.json()["tool_calls"][0]["name"] == "add_task"
    cid = turn.json()["conversation_id"]
    streamed = await http.post("/api/chat/stream", json={"message": "list my tasks"}, headers=ALICE)
    assert streamed.status_code == 200
    refused = await http.post("/api/chat", json={"message": "one too many"}, headers=ALICE)
    assert refused.status_code == 429
    await http.get(f"/api/conversations/{cid}", headers=ALICE)
    await http.get("/no/such/route/42")

    response = await http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text

    def grew(name: str, **labels: str) -> float:
        after = sample(text, name, **labels)
        assert after is not None, (name, labels)
        return after - (sample(before, name, **labels) or 0)

    assert grew("chat_backend_http_requests_total", method="POST", route="/api/chat", status="200") == 1
    assert grew("chat_backend_http_requests_total", method="POST", route="/api/chat", status="429") == 1
    assert grew("chat_backend_http_requests_total", route="/api/conversations/{conversation_id}", status="200") == 1
    assert grew("chat_backend_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert grew("chat_backend_turn_duration_seconds_count", outcome="complete") == 2
    assert grew("chat_backend_turns_refused_total", status="429", code="rate_limited") == 1
    assert grew("chat_backend_model_tokens_total", model="offline", kind="input") > 0
    assert grew("chat_backend_model_tokens_total", model="offline", kind="output") > 0
    assert grew("chat_backend_model_latency_seconds_count", model="offline") >= 2
    assert grew("chat_backend_tool_calls_total", tool="add_task", outcome="ok") == 1
    assert grew("chat_backend_mcp_tool_calls_total", tool="add_task", outcome="ok") == 1  # the MCP app's thread
    assert sample(text, "chat_backend_db_pool_connections_in_use") is not None
    assert sample(text, "chat_backend_sse_streams_open") == 0  # the stream has ended
    # Bounded labels: no user id, conversation id or raw path anywhere.
    assert "alice-observed" not in text and cid not in text and "/no/such/route" not in text


async def test_a_metrics_token_is_required_when_set(database_url: str) -> None:
    settings = make_settings(database_url, metrics_token="scrape-me-0123456789")
    async with api_client(settings) as http:
        refused = await http.get("/metrics")
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        allowed = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me-0123456789"})
        assert allowed.status_code == 200 and "chat_backend_http_requests_total" in allowed.text


async def test_metrics_can_be_switched_off(database_url: str) -> None:
    async with api_client(make_settings(database_url, metrics_enabled=False)) as http:
        response = await http.get("/metrics")
        assert response.status_code == 404 and response.json()["code"] == "not_found"


# --- real processes ---------------------------------------------------------------------------------


def _env(database_url: str, **extra: str) -> dict[str, str]:
    return process_env(database_url, **{"LOG_LEVEL": "INFO", "WEB_CONCURRENCY": "1", **extra})


@contextmanager
def _process(command: str, env: dict[str, str], base: str, log: Path, workers: int = 1) -> Iterator[None]:
    """`chat-backend COMMAND` with its stdout and stderr in `log`, up and (all workers) answering."""
    full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", command], env={**full_env, **env}, stdout=out, stderr=out
        )
        try:
            wait_http(f"{base}/health", timeout=120, proc=proc)
            deadline = time.monotonic() + 120
            while workers > 1 and len(worker_pids(proc.pid)) < workers:
                assert time.monotonic() < deadline, "the workers did not start"
                time.sleep(0.2)
            yield
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line in {path.name}: {line!r}")
    return parsed


@pytest.fixture(scope="module")
def stack(pg_admin_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`mcp` and `serve` (LOG_FORMAT=json) as processes with captured logs."""
    name = db.clone(pg_admin_url, template_db)
    logs = tmp_path_factory.mktemp("logs")
    api_port, mcp_port = free_port(), free_port()
    env = _env(
        db.with_database(pg_admin_url, name),
        API_PORT=str(api_port),
        MCP_URL=f"http://127.0.0.1:{mcp_port}/mcp",
        LOG_FORMAT="json",
    )
    api, mcp = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{mcp_port}"
    try:
        with _process("mcp", env, mcp, logs / "mcp.log"), _process("serve", env, api, logs / "api.log"):
            yield {"api": api, "mcp": mcp, "api_log": logs / "api.log", "mcp_log": logs / "mcp.log"}
    finally:
        db.drop(pg_admin_url, name)


def test_a_turn_is_followed_from_the_api_log_to_the_mcp_log(stack: dict[str, Any]) -> None:
    token = user_token("bob-observed", ttl=600)
    request_id = "trace-42.abc:1"
    response = httpx.post(
        f"{stack['api']}/api/chat",
        json={"message": "add water the secret plants"},
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    body = response.json()
    assert body["tool_calls"][0]["name"] == "add_task"
    # The MCP server's own metrics saw the call.
    mcp_metrics = httpx.get(f"{stack['mcp']}/metrics").text
    assert (sample(mcp_metrics, "chat_backend_mcp_tool_calls_total", tool="add_task", outcome="ok") or 0) >= 1
    served = sample(mcp_metrics, "chat_backend_http_requests_total", method="POST", route="/mcp", status="200")
    assert (served or 0) >= 1

    deadline = time.monotonic() + 10  # a line may still be in flight to the file
    while True:
        api_lines, mcp_lines = _json_lines(stack["api_log"]), _json_lines(stack["mcp_log"])
        turn_lines = [e for e in api_lines if e["message"].startswith("turn ") and e["request_id"] == request_id]
        tool_lines = [e for e in mcp_lines if e["request_id"] == request_id and e["message"].startswith("tool ")]
        if (turn_lines and tool_lines) or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    (turn,) = turn_lines
    assert turn["level"] == "INFO" and turn["logger"] == "backend.services.turn" and turn["timestamp"]
    assert turn["conversation_id"] == body["conversation_id"] and turn["message_id"] == body["message_id"]
    assert turn["model"] == "offline" and turn["outcome"] == "complete"
    assert turn["duration_ms"] >= 0 and turn["tool_count"] == 1
    assert turn["input_tokens"] == body["usage"]["input_tokens"]
    assert turn["output_tokens"] == body["usage"]["output_tokens"]
    assert turn["user_id"] == "bob-observed"
    assert [line["tool"] for line in tool_lines] == ["add_task"]
    assert tool_lines[0]["outcome"] == "ok"
    # The MCP process's access log line for the call carries the API's id too.
    assert any("POST /mcp" in e["message"] for e in mcp_lines if e["request_id"] == request_id)

    everything = stack["api_log"].read_text() + stack["mcp_log"].read_text()
    assert token not in everything and "Bearer" not in everything
    assert "eyJ" not in everything  # no JWT at all: neither the user's nor the delegation token
    assert "secret plants" not in everything  # message text (and the task title) is not logged at INFO


def test_a_head_refused_before_the_app_carries_a_request_id(stack: dict[str, Any]) -> None:
    """431 is answered by the HTTP protocol, before the app (and its middleware) runs."""
    headers = {f"X-Filler-{n}": "x" for n in range(150)} | {"X-Request-ID": "big-head-1"}
    response = httpx.get(f"{stack['api']}/health", headers=headers)
    assert response.status_code == 431 and response.json()["code"] == "headers_too_large"
    assert response.json()["request_id"] == response.headers["x-request-id"] == "big-head-1"


def test_serve_sums_metrics_across_workers(pg_admin_url: str, template_db: str, tmp_path: Path) -> None:
    name = db.clone(pg_admin_url, template_db)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # An operator's own directory, with a stale file of an earlier run: emptied at start.
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    (multiproc / "counter_999999.db").write_bytes(b"stale garbage")
    env = _env(
        db.with_database(pg_admin_url, name),
        API_PORT=str(port),
        WEB_CONCURRENCY="2",
        LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    try:
        with _process("serve", env, base, tmp_path / "serve.log", workers=2):
            assert not (multiproc / "counter_999999.db").exists()
            before = httpx.get(f"{base}/metrics").text
            start = sample(before, "chat_backend_http_requests_total", method="GET", route="/health", status="200")
            for _ in range(12):
                with httpx.Client() as one_connection:  # a new connection each: any worker may take it
                    assert one_connection.get(f"{base}/health").status_code == 200
            totals = set()
            for _ in range(8):
                with httpx.Client() as one_connection:
                    text = one_connection.get(f"{base}/metrics").text
                value = sample(text, "chat_backend_http_requests_total", method="GET", route="/health", status="200")
                totals.add(value)
                assert "pid=" not in text  # summed, not one series per worker
            # Every scrape, whichever worker answers it, sees every worker's requests.
            assert totals == {(start or 0) + 12}
            assert len({p.name.split("_")[-1] for p in multiproc.glob("counter_*.db")}) == 2  # both workers wrote
    finally:
        db.drop(pg_admin_url, name)


def test_text_logs_are_the_default() -> None:
    """LOG_FORMAT unset: one readable line per record, with its request id in brackets."""
    script = (
        "import logging; from backend.logging_setup import configure_logging; "
        "from backend.config import Settings; from backend.request_context import REQUEST_ID; "
        "configure_logging(Settings(_env_file=None)); REQUEST_ID.set('rid-7'); "
        "logging.getLogger('backend.x').info('hello %s', 'there', extra={'outcome': 'complete'})"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOG_FORMAT", "LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    (line,) = done.stderr.strip().splitlines()
    assert line.endswith("INFO backend.x [rid-7] hello there"), line
