"""The API app factory.

`app.state` holds only process-wide plumbing (settings, the database, the token verifier, the turn
service with its task-tool client, an HTTP client pool): nothing about a user or a conversation
survives a request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from agents import Model
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from backend import __version__
from backend.agent.factory import make_model, warm_up
from backend.agent.mcp_client import TaskServer
from backend.api import chat, chat_ui, chatkit, conversations, health, openapi
from backend.auth import TokenVerifier
from backend.config import Settings
from backend.db import Database, make_engine
from backend.errors import BodyLimitMiddleware, LastResortMiddleware, install_error_handlers
from backend.metrics import HttpMetricsMiddleware, metrics_endpoint
from backend.request_context import RequestIdMiddleware
from backend.services.chatkit_server import TaskChatKitServer
from backend.services.chatkit_store import ConversationStore
from backend.services.turn import TurnService


async def warm_routes(app: FastAPI) -> None:
    """FastAPI builds each router's routes on the first request that walks them: one request that
    matches nothing walks them all, at start-up instead of in a user's request."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://warm-up") as client:
        await client.get("/.warm-up")


def create_app(
    settings: Settings | None = None,
    *,
    model_factory: Callable[[], Model] | None = None,
) -> FastAPI:
    """The API. `model_factory` lets tests stand in for the model."""
    settings = settings or Settings()
    settings.validate_for_api()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await warm_up(settings)
        # The first connection runs SQLAlchemy's dialect set-up (several queries): here, not in a turn.
        # Not required: a database that is not up yet is reached on the first request instead.
        await db.ping(within=2.0)
        await warm_routes(app)
        await tools.prefetch(settings.resolved_mcp_secret())
        yield
        await app.state.http.aclose()
        await tools.aclose()
        await app.state.verifier.aclose()
        engine.dispose()

    app = FastAPI(
        title="Task chat backend",
        version=__version__,
        summary="Stateless multi-user chat with an AI assistant that manages todo tasks",
        lifespan=lifespan,
    )
    engine = make_engine(settings)
    db = Database(engine, settings.db_timeout_seconds, settings.db_pool_size + settings.db_max_overflow)
    tools = TaskServer(settings)
    turns = TurnService(db, settings, model_factory or (lambda: make_model(settings)), tools)
    app.state.settings = settings
    app.state.engine = engine
    app.state.db = db
    app.state.verifier = TokenVerifier(settings)
    app.state.http = httpx.AsyncClient(timeout=10.0)
    app.state.turns = turns
    app.state.chatkit = TaskChatKitServer(ConversationStore(db, turns), turns)

    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        per_path={"/api/chat/ui": settings.max_ui_body_bytes},
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
            max_age=600,
        )
    app.add_middleware(LastResortMiddleware)
    # Outermost: every answer, the last-resort 500 included, is counted and carries X-Request-ID.
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    if settings.metrics_enabled:
        app.add_route("/metrics", metrics_endpoint(settings.metrics_token), methods=["GET"], include_in_schema=False)
    app.include_router(health.router)
    app.include_router(conversations.router)
    app.include_router(chat.router)
    app.include_router(chat_ui.router)
    app.include_router(chatkit.router)
    openapi.install(app)
    return app
