"""Every Prometheus metric of both processes, the hooks that feed them, and `GET /metrics`.

One module so the whole list is in one place (the README's "Operating it" mirrors it). Labels are
bounded by construction: route *templates* (never raw paths), methods, statuses, error codes, the
configured model, tool names. No user id or conversation id ever becomes a label.

With several `serve` workers, each process writes its values to files under
`PROMETHEUS_MULTIPROC_DIR` (set by backend/server.py before the workers start) and a scrape of any
worker sums them all (`MultiProcessCollector`). prometheus-client decides between in-memory and file
values when it is imported, from that same variable, so this module reads it once, at import, too.
Gauges use `livesum`: the sum over the workers alive now.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import Engine, event
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from backend.asgi import HttpMiddleware, WatchedSend
from backend.errors import BEARER, status_of, with_request_id
from backend.failures import ServiceError

# prometheus-client's own switch (not a setting of this app), read the way it reads it.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TURN_SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

HTTP_REQUESTS = Counter("chat_backend_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "chat_backend_http_request_duration_seconds",
    "Time from a request's arrival to its last response byte (a stream's whole life)",
    ["method", "route"],
    buckets=_SECONDS,
)
TURN_DURATION = Histogram(
    "chat_backend_turn_duration_seconds",
    "Chat turns by how they ended (complete, error, aborted), from the run's start to its reply being stored",
    ["outcome"],
    buckets=_TURN_SECONDS,
)
TURN_ERRORS = Counter("chat_backend_turn_errors_total", "Turns that ended in an error, by error code", ["code"])
TURNS_REFUSED = Counter(
    "chat_backend_turns_refused_total",
    "Turns refused before running (busy conversation, per-user limits, database down...)",
    ["status", "code"],
)
MODEL_LATENCY = Histogram(
    "chat_backend_model_latency_seconds", "One model call, request to complete response", ["model"], buckets=_SECONDS
)
MODEL_TOKENS = Counter("chat_backend_model_tokens_total", "Model tokens used by turns", ["model", "kind"])
TOOL_CALLS = Counter("chat_backend_tool_calls_total", "Task tool calls made by turns (API side)", ["tool", "outcome"])
MCP_TOOL_CALLS = Counter(
    "chat_backend_mcp_tool_calls_total", "Task tool calls served (MCP server side)", ["tool", "outcome"]
)
DB_POOL_IN_USE = Gauge(
    "chat_backend_db_pool_connections_in_use",
    "Database connections checked out of this service's pools",
    multiprocess_mode="livesum",
)
SSE_STREAMS_OPEN = Gauge(
    "chat_backend_sse_streams_open", "Server-Sent Event streams open now", multiprocess_mode="livesum"
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


# --- hooks -------------------------------------------------------------------------------------------


def turn_finished(outcome: str, error_code: str | None, seconds: float, model: str, usage: dict[str, int]) -> None:
    TURN_DURATION.labels(outcome).observe(seconds)
    if error_code and outcome == "error":
        TURN_ERRORS.labels(error_code).inc()
    MODEL_TOKENS.labels(model, "input").inc(usage.get("input_tokens", 0))
    MODEL_TOKENS.labels(model, "output").inc(usage.get("output_tokens", 0))


def turn_refused(error: ServiceError) -> None:
    TURNS_REFUSED.labels(str(status_of(error)), error.code).inc()


def model_called(model: str, seconds: float) -> None:
    MODEL_LATENCY.labels(model).observe(seconds)


def tool_called(tool: str, outcome: str) -> None:
    TOOL_CALLS.labels(tool, outcome).inc()


def mcp_tool_served(tool: str, outcome: str) -> None:
    MCP_TOOL_CALLS.labels(tool, outcome).inc()


def track_pool(engine: Engine) -> None:
    """Count the engine's checked-out connections (events, so every worker's file stays current)."""
    event.listen(engine, "checkout", lambda *_: DB_POOL_IN_USE.inc())
    event.listen(engine, "checkin", lambda *_: DB_POOL_IN_USE.dec())


def mark_process_dead(pid: int) -> None:
    """A worker's end: drop its live gauges from the sums (uvicorn restarts workers that die)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# --- HTTP --------------------------------------------------------------------------------------------


def route_label(scope: Scope) -> str:
    """The matched route's template (`/api/conversations/{conversation_id}`), never the raw path."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class HttpMetricsMiddleware(HttpMiddleware):
    """Requests by method, route template and status, and their duration (pure ASGI: streams stream)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        watched = WatchedSend(send)
        status = 0
        started = time.perf_counter()
        try:
            await self.app(scope, receive, watched)
            status = watched.status or 0
        except BaseException:
            status = watched.status or 500
            raise
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = route_label(scope)
            # 499 (nginx's "client closed request"): the client left before any answer.
            HTTP_REQUESTS.labels(method, route, str(status or 499)).inc()
            HTTP_DURATION.labels(method, route).observe(time.perf_counter() - started)


def render() -> bytes:
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def metrics_endpoint(token: str | None) -> Callable[[Request], Awaitable[Response]]:
    """`GET /metrics` in Prometheus' text format, behind `Authorization: Bearer <token>` when one is set."""
    expected = f"Bearer {token}".encode() if token else None

    async def metrics(request: Request) -> Response:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                body = with_request_id({"detail": "Invalid or missing metrics token", "code": "unauthorized"})
                return JSONResponse(body, status_code=401, headers=BEARER)
        return Response(render(), media_type=CONTENT_TYPE_LATEST)

    return metrics
