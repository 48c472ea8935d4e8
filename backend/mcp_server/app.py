"""The MCP server's ASGI app: streamable HTTP at MCP_URL's path, plus /health, /health/ready and /metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, cast, get_args

import anyio
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from backend import __version__
from backend.config import Settings
from backend.db import Database, make_engine
from backend.delegation import SCOPE
from backend.mcp_server.auth import DelegationTokenVerifier
from backend.mcp_server.task_store import purge_tool_calls
from backend.mcp_server.tools import task_tools
from backend.metrics import HttpMetricsMiddleware, metrics_endpoint
from backend.request_context import RequestIdMiddleware

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "Manage the signed-in user's to-do list: add_task, list_tasks, complete_task, update_task, delete_task. "
    "Tasks are identified by the user's own task number (task_id: 1, 2, 3, ...); "
    "call list_tasks to find a task's number from its title."
)

# /health/ready answers within this, whatever the database does (a stalled one is "unavailable").
READY_SECONDS = 2.0

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _log_level(name: str) -> LogLevel:
    # MCPServer configures logging itself; keep it at LOG_LEVEL rather than its INFO default.
    upper = name.upper()
    return cast(LogLevel, upper) if upper in get_args(LogLevel) else "INFO"


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection that also accepts MCP_URL's host and MCP_ALLOWED_HOSTS (compose names)."""
    hosts: list[str] = []
    origins: list[str] = []
    for raw in dict.fromkeys(["127.0.0.1", "localhost", "::1", settings.mcp_host, *settings.mcp_allowed_hosts]):
        name = f"[{raw}]" if raw.count(":") > 1 and not raw.startswith("[") else raw  # bare IPv6
        # "mcp:8001" pins a port; a bare "mcp" allows any port (and none).
        pinned = ":" in name.rsplit("]", 1)[-1]
        hosts += [name] if pinned else [name, f"{name}:*"]
        for scheme in ("http", "https"):
            origins += [f"{scheme}://{name}"] if pinned else [f"{scheme}://{name}", f"{scheme}://{name}:*"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def create_mcp_app(settings: Settings, *, json_response: bool = True) -> Starlette:
    """The whole MCP server process as one ASGI app (what `chat-backend mcp` serves). Each answer is one
    JSON body; `json_response=False` streams them as SSE instead, as other MCP servers may."""
    db = Database(make_engine(settings), settings.db_timeout_seconds, settings.db_pool_size + settings.db_max_overflow)
    server: MCPServer[Any] = MCPServer(
        name="chat-backend-tasks",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level=_log_level(settings.log_level),
        tools=list(task_tools(db)),
        token_verifier=DelegationTokenVerifier(settings.resolved_mcp_secret()),
        auth=AuthSettings(
            # Required by the SDK, but advertised nowhere: no authorization server exists. Without a
            # resource_server_url the SDK serves no protected-resource metadata and its 401 names none
            # (`WWW-Authenticate: Bearer error="invalid_token", ...`), so no client is sent to an
            # authorization server that is not there; a bad token reads as an invalid token.
            issuer_url=AnyHttpUrl(settings.mcp_base_url),
            resource_server_url=None,
            required_scopes=[SCOPE],
        ),
    )
    mcp_app = server.streamable_http_app(
        streamable_http_path=settings.mcp_path,
        stateless_http=True,  # no session state: any replica can answer any request
        json_response=json_response,
        transport_security=transport_security(settings),
    )

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    async def ready(_: Request) -> JSONResponse:
        if await db.ping(within=READY_SECONDS):
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable", "checks": {"database": False}}, status_code=503)

    async def purge_hourly() -> None:
        while True:
            try:
                await db.run_orm(purge_tool_calls)
            except Exception:  # the database may be briefly away; try again next hour
                log.warning("could not purge old tool_call rows", exc_info=True)
            await anyio.sleep(3600)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # A mounted app's own lifespan never runs, so the parent runs the session manager.
        try:
            async with server.session_manager.run(), anyio.create_task_group() as tasks:
                tasks.start_soon(purge_hourly)
                yield
                tasks.cancel_scope.cancel()
        finally:
            db.engine.dispose()

    routes = [Route("/health", health, methods=["GET"]), Route("/health/ready", ready, methods=["GET"])]
    if settings.metrics_enabled:
        routes.append(Route("/metrics", metrics_endpoint(settings.metrics_token), methods=["GET"]))
    return Starlette(
        routes=[*routes, Mount("/", app=mcp_app)],
        # The API's X-Request-ID arrives with each tool call: the tools' log lines carry it.
        middleware=[Middleware(RequestIdMiddleware), Middleware(HttpMetricsMiddleware)],
        lifespan=lifespan,
    )
