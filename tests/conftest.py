"""Shared fixtures: a real PostgreSQL database per test, settings, tokens."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

import httpx
import litellm
import pytest
import sqlalchemy
from agents.testing import ScriptedModel
from fastapi import FastAPI
from sqlalchemy import Engine

from backend.config import Settings
from backend.main import create_app
from tests.support import db
from tests.support.gemini_stub import GeminiStub
from tests.support.stack import api_client, mcp_server, with_free_mcp_port
from tests.support.tokens import TEST_AUTH_SECRET

TEST_MCP_SECRET = "test-mcp-secret-0123456789abcdef0123456789"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url, started = db.admin_url()
    yield url
    if started:
        db.stop_test_server()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    name = db.create_template(pg_admin_url)
    yield name
    db.drop(pg_admin_url, name)


@pytest.fixture
def database_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of its own for this test."""
    name = db.clone(pg_admin_url, template_db)
    yield db.with_database(pg_admin_url, name)
    db.drop(pg_admin_url, name)


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "app_env": "production",
        "database_url": database_url,
        "auth_secret": TEST_AUTH_SECRET,
        "mcp_token_secret": TEST_MCP_SECRET,
        "chat_model": "offline",
        "db_pool_size": 5,
        "db_max_overflow": 5,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API app in process (no MCP server behind it)."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http,
    ):
        yield http


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The test's own view of its database (no statement timeout: tests also load data)."""
    eng = sqlalchemy.create_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def stack_settings(settings: Settings) -> Iterator[Settings]:
    """Settings whose MCP_URL has the real MCP server behind it (loopback, a thread of this process)."""
    settings = with_free_mcp_port(settings)
    with mcp_server(settings):
        yield settings


@pytest.fixture
def scripted() -> ScriptedModel:
    return ScriptedModel()


@pytest.fixture
async def scripted_app(
    stack_settings: Settings, scripted: ScriptedModel
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The API in process with `scripted` as its model, in front of the real MCP server."""
    app = create_app(stack_settings, model_factory=lambda: scripted)
    async with api_client(stack_settings, app=app) as client:
        yield app, client


GEMINI_TEST_KEY = "test-key"


@pytest.fixture(scope="session")
def gemini_server() -> Iterator[GeminiStub]:
    """One local Gemini REST stub for the session (it checks the key like Google does)."""
    previous = litellm.suppress_debug_info
    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banner per error
    with GeminiStub(expected_api_key=GEMINI_TEST_KEY) as stub:
        yield stub
    litellm.suppress_debug_info = previous


@pytest.fixture
def stub(gemini_server: GeminiStub) -> GeminiStub:
    """The Gemini stub with an empty script and no recorded requests."""
    gemini_server.reset()
    return gemini_server
