"""An in-process API in front of a real MCP server on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
from agents import Model
from fastapi import FastAPI

from backend.config import Settings
from backend.main import create_app
from backend.mcp_server.app import create_mcp_app
from tests.support.servers import free_port, serve_in_thread


@contextmanager
def mcp_server(settings: Settings) -> Iterator[str]:
    """Serve the MCP app for `settings` (whose MCP_URL names a free port); yields its base URL."""
    with serve_in_thread(create_mcp_app(settings), port=settings.mcp_port, health_path="/health") as base:
        yield base


def with_free_mcp_port(settings: Settings) -> Settings:
    return settings.model_copy(update={"mcp_url": f"http://127.0.0.1:{free_port()}/mcp"})


@asynccontextmanager
async def api_client(
    settings: Settings, model_factory: Callable[[], Model] | None = None, app: FastAPI | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the API app in process (lifespan included)."""
    app = app or create_app(settings, model_factory=model_factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=30) as http,
    ):
        yield http
